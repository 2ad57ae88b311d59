"""zipvl-ray: serve vision-language models with ZipVL dynamic token sparsity on Ray Serve.

The library (this package) holds the algorithm (:mod:`zipvl_ray.sparsity`), its transformers
integration (:mod:`zipvl_ray.attention`, :mod:`zipvl_ray.cache`), model loading
(:mod:`zipvl_ray.models`), the paged engine, routing, API schemas and telemetry. Ray Serve is only
imported by the routing and serving glue.

The names below are imported lazily: ``import zipvl_ray.routing.router`` (which runs in every Serve
proxy and ingress replica) must not pay for torch and transformers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from zipvl_ray._lazy import lazy_getattr

__version__ = "0.1.0"

_EXPORTS = {
    "CacheStats": "zipvl_ray.cache",
    "ZipVLCache": "zipvl_ray.cache",
    "EngineConfig": "zipvl_ray.config",
    "ZipVLConfig": "zipvl_ray.config",
    "enable_zipvl": "zipvl_ray.attention",
    "set_zipvl_config": "zipvl_ray.attention",
    "load_model": "zipvl_ray.models",
}

__all__ = [
    "CacheStats",
    "EngineConfig",
    "ZipVLCache",
    "ZipVLConfig",
    "enable_zipvl",
    "load_model",
    "set_zipvl_config",
]

if TYPE_CHECKING:  # pragma: no cover
    from zipvl_ray.attention import enable_zipvl, set_zipvl_config
    from zipvl_ray.cache import CacheStats, ZipVLCache
    from zipvl_ray.config import EngineConfig, ZipVLConfig
    from zipvl_ray.models import load_model


__getattr__ = lazy_getattr(__name__, _EXPORTS)
