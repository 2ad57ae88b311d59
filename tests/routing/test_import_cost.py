"""Routers run in every Serve proxy and ingress replica: importing them must not load torch."""

from tests.import_check import heavy_modules_loaded_by


def test_router_and_policy_import_without_torch():
    statement = (
        "import zipvl_ray.routing.router, zipvl_ray.routing.autoscaling, zipvl_ray.routing.replica_stats"
    )
    assert heavy_modules_loaded_by(statement) == []


def test_lazy_package_exports_still_work():
    import zipvl_ray
    from zipvl_ray.engine import SamplingParams

    assert zipvl_ray.ZipVLConfig().tau == 0.975
    assert SamplingParams(max_tokens=3).max_tokens == 3
