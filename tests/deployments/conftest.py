"""Fixtures of the Serve tests: a local Ray cluster (one per module) and free ports."""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


#: Ports a Ray cluster binds by default whether or not they are free when a test picks its own: the GCS,
#: the dashboard and its agent, the Ray client server, Serve's HTTP and gRPC defaults, and the
#: autoscaler's and the dashboard's Prometheus servers. A "free" port taken before the cluster starts can
#: be one of them: a fresh-clone run once got 44217, the autoscaler's metrics server took it when `serve
#: run` started its cluster, and every request of the module went to that server.
RAY_DEFAULT_PORTS = frozenset({6379, 8000, 8265, 9000, 10001, 44217, 44227, 52365})


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports (all bound at once, so the kernel cannot hand one out twice), none of
    them a port Ray binds by default (:data:`RAY_DEFAULT_PORTS`)."""
    with contextlib.ExitStack() as stack:
        ports: list[int] = []
        while len(ports) < count:
            s = stack.enter_context(socket.socket())
            s.bind(("127.0.0.1", 0))
            if (port := s.getsockname()[1]) not in RAY_DEFAULT_PORTS:
                ports.append(port)
        return ports


def free_port() -> int:
    """A free port that Ray does not bind by default."""
    return free_ports(1)[0]


def ray_test_env(**extra: str) -> dict[str, str]:
    """Environment of every Ray process in the tests: offline hubs, loopback only, this repo importable."""
    env = {
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "PYTHONPATH": os.pathsep.join(p for p in [str(REPO_ROOT), os.environ.get("PYTHONPATH", "")] if p),
    }
    env.update(extra)
    return env
