"""Serve's HTTP proxy imports the request-id / error callback at start-up: it must not load torch.

A proxy that starts slowly fails Serve's readiness check (5 s, three times) on a busy node and is
killed and restarted; importing the prompt processor (and torch with it) took 6 s on an idle 2-core
machine.
"""

import pytest

from tests.import_check import HEAVY, heavy_modules_loaded_by


def test_proxy_callback_imports_without_torch():
    statement = "from zipvl_ray.api.middleware import proxy_middlewares"
    assert heavy_modules_loaded_by(statement, (*HEAVY, "zipvl_ray.api.server")) == []


def test_api_exports_resolve_on_first_use():
    import zipvl_ray.api as api

    for name in api.__all__:
        assert getattr(api, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = api.nope
