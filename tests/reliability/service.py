"""A local Ray cluster running zipvl-ray applications, and a client for the reliability tests.

One cluster per test module: :func:`ray_cluster` starts Ray on 127.0.0.1 with the given node
environment (which the HTTP proxy and every replica inherit: the proxy callback, the API keys as a
Kubernetes Secret would put them), Serve's HTTP proxy on a free port, and stops both at the end.
:class:`Service` talks to one application over real HTTP and reads its per-replica statistics.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.deployments.conftest import free_port, ray_test_env
from zipvl_ray.api.images import ImageLimits
from zipvl_ray.api.middleware import PROXY_CALLBACK_IMPORT_PATH

#: Keys the tests' services accept (as an operator would put them in a Secret).
API_KEYS = ("zk-reliability-key-one-7f3a9c", "zk-reliability-key-two-51be0d")
#: Serve names replica actors ``SERVE_REPLICA::<app>#<deployment>#<replica id>`` in namespace "serve".
REPLICA_PREFIX = "SERVE_REPLICA::"


@dataclass
class Cluster:
    """A running local Ray cluster with Serve's HTTP proxy."""

    port: int
    logs_dir: Path

    def url(self, route_prefix: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{route_prefix.rstrip('/')}"


@contextmanager
def ray_cluster(secret_env: dict[str, str] | None = None, **node_env: str) -> Iterator[Cluster]:
    """Ray + Serve on loopback, with ``node_env`` and ``secret_env`` in the environment of every Ray process.

    The proxy callback (:data:`PROXY_CALLBACK_IMPORT_PATH`) is always installed: Serve's proxy reads
    it from its own environment only, so it goes in the node environment, as on a real node.
    ``secret_env`` (API keys) reaches the processes only through the node environment, as a Kubernetes
    Secret does, never through a ``runtime_env``: Ray's runtime-env agent writes runtime envs, their
    variables included, to its log file.
    """
    import pytest

    ray = pytest.importorskip("ray")
    from ray import serve

    env = ray_test_env(RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=PROXY_CALLBACK_IMPORT_PATH, **node_env)
    with pytest.MonkeyPatch.context() as patch:
        for key, value in {**env, **(secret_env or {})}.items():
            patch.setenv(key, value)
        ray.init(address="local", num_cpus=2, include_dashboard=False, runtime_env={"env_vars": env})
        try:
            port = free_port()
            serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 120})
            logs_dir = Path(ray._private.worker._global_node.get_logs_dir_path())
            yield Cluster(port=port, logs_dir=logs_dir)
        finally:
            serve.shutdown()
            ray.shutdown()


@dataclass
class Service:
    """One zipvl-ray application behind Serve's proxy, reached over loopback HTTP."""

    base_url: str
    app_name: str
    model: str
    max_model_len: int
    limits: ImageLimits = field(default_factory=ImageLimits)
    api_key: str | None = None
    timeout_s: float = 60.0

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(
            **{"base_url": self.base_url, "headers": self.headers, "timeout": self.timeout_s, **kwargs}
        )

    def async_client(self, **kwargs: Any) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            **{"base_url": self.base_url, "headers": self.headers, "timeout": self.timeout_s, **kwargs}
        )

    def body(self, text: str = "What is this?", image_urls: list[str] | None = None, **extra: Any) -> dict:
        parts = [{"type": "image_url", "image_url": {"url": url}} for url in image_urls or []]
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}],
            "max_tokens": 16,
            "temperature": 0,
        }
        body.update(extra)
        return body

    def stats(self) -> dict[str, Any]:
        with self.client() as client:
            response = client.get("/v1/stats")
        assert response.status_code == 200, response.text
        return response.json()

    def llm_totals(self) -> dict[str, float]:
        """KV bytes held and request counts, summed over the LLM replicas that answered."""
        entries = self.stats()["llm"]
        replicas = [r for r in entries if "error" not in r]
        keys = (
            "kv_bytes_used",
            "num_running",
            "num_waiting",
            "num_aborted",
            "num_aborted_waiting",
            "num_finished",
            "reserved_bytes",
        )
        return {key: sum(float(r.get(key, 0) or 0) for r in replicas) for key in keys} | {
            "replicas": len(replicas),
            "unanswered": len(entries) - len(replicas),
        }

    def wait_llm_idle(self, *, timeout_s: float = 30.0) -> dict[str, float]:
        """Poll until no LLM replica holds KV or runs / queues a request; returns the totals then."""
        deadline = time.monotonic() + timeout_s
        while True:
            totals = self.llm_totals()
            idle = totals["kv_bytes_used"] == 0 and totals["num_running"] == 0 and totals["num_waiting"] == 0
            if idle and totals["replicas"] and not totals["unanswered"]:  # a silent replica is no answer
                return totals
            assert time.monotonic() < deadline, f"the LLM replicas are not idle after {timeout_s} s: {totals}"
            time.sleep(0.2)

    def healthy(self) -> bool:
        with httpx.Client(base_url=self.base_url, timeout=self.timeout_s) as client:
            return client.get("/health").status_code == 200


# ---------------------------------------------------------------------------------------------------
# Replica processes


def replica_actors(app_name: str, deployment: str) -> dict[str, Any]:
    """``replica id -> actor handle`` of a deployment's live replicas."""
    import ray

    prefix = f"{REPLICA_PREFIX}{app_name}#{deployment}#"
    out = {}
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry["name"].startswith(prefix):
            try:
                out[entry["name"][len(prefix) :]] = ray.get_actor(entry["name"], namespace=entry["namespace"])
            except ValueError:  # gone since the listing
                continue
    return out


def proxy_actors() -> dict[str, Any]:
    """``name -> actor handle`` of Serve's HTTP proxies."""
    import ray

    out = {}
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry["name"].startswith("SERVE_PROXY_ACTOR"):
            out[entry["name"]] = ray.get_actor(entry["name"], namespace=entry["namespace"])
    return out


def _pid_of_self(_replica: Any) -> int:
    return os.getpid()


def replica_pid(actor: Any) -> int:
    """The process id of a replica actor (asked from inside the actor)."""
    import ray

    return ray.get(actor.__ray_call__.remote(_pid_of_self), timeout=30)


def rss_bytes(pid: int) -> int:
    """Resident set size of a local process, from ``/proc``."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")
