"""Routers run in every Serve proxy and ingress replica: importing them must not load torch."""

import subprocess
import sys


def test_router_and_policy_import_without_torch():
    code = (
        "import sys; import zipvl_ray.routing.router, zipvl_ray.routing.autoscaling, zipvl_ray.routing.replica_stats; "
        "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]; "
        "print(','.join(heavy)); sys.exit(1 if heavy else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"importing the router loaded {result.stdout.strip()}"


def test_lazy_package_exports_still_work():
    import zipvl_ray
    from zipvl_ray.engine import SamplingParams

    assert zipvl_ray.ZipVLConfig().tau == 0.975
    assert SamplingParams(max_tokens=3).max_tokens == 3
