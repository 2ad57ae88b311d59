"""zipvl-ray: serve vision-language models with ZipVL dynamic token sparsity on Ray Serve.

The library (this package) holds the algorithm (:mod:`zipvl_ray.sparsity`), its transformers
integration (:mod:`zipvl_ray.attention`, :mod:`zipvl_ray.cache`), model loading
(:mod:`zipvl_ray.models`), the paged engine, routing, API schemas and telemetry. Ray Serve is only
imported by the routing and serving glue.
"""

from zipvl_ray.attention import enable_zipvl, set_zipvl_config
from zipvl_ray.cache import CacheStats, ZipVLCache
from zipvl_ray.config import EngineConfig, ZipVLConfig
from zipvl_ray.models import load_model

__version__ = "0.1.0"

__all__ = [
    "CacheStats",
    "EngineConfig",
    "ZipVLCache",
    "ZipVLConfig",
    "enable_zipvl",
    "load_model",
    "set_zipvl_config",
]
