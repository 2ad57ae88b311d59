"""Serve's HTTP proxy imports the request-id / error callback at start-up: it must not load torch.

A proxy that starts slowly fails Serve's readiness check (5 s, three times) on a busy node and is
killed and restarted; importing the prompt processor (and torch with it) took 6 s on an idle 2-core
machine.
"""

import subprocess
import sys

import pytest


def test_proxy_callback_imports_without_torch():
    code = (
        "import sys; from zipvl_ray.api.middleware import proxy_middlewares; "
        "heavy = [m for m in ('torch', 'transformers', 'zipvl_ray.api.server') if m in sys.modules]; "
        "print(','.join(heavy)); sys.exit(1 if heavy else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"importing the proxy callback loaded {result.stdout.strip()}"


def test_api_exports_resolve_on_first_use():
    import zipvl_ray.api as api

    for name in api.__all__:
        assert getattr(api, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = api.nope
