"""KV-footprint prediction (Ray-free) and, in submodules, the Ray Serve router and autoscaling policy.

Importing this package does not import Ray; ``zipvl_ray.routing.router`` and
``zipvl_ray.routing.autoscaling`` do.
"""

from zipvl_ray.routing.footprint import (
    KVProfile,
    RoutingHints,
    effective_keep_fractions,
    predict_bytes,
    predict_request_bytes,
)

__all__ = ["KVProfile", "RoutingHints", "effective_keep_fractions", "predict_bytes", "predict_request_bytes"]
