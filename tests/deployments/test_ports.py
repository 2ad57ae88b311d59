"""The tests' free-port helper skips the ports a Ray cluster binds by default."""

from __future__ import annotations

import socket

from tests.deployments import conftest


class _FakeSocket:
    """A socket whose ``bind(("127.0.0.1", 0))`` hands out the next port of a fixed list."""

    ports: list[int] = []

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        return False

    def bind(self, address):
        self.port = _FakeSocket.ports.pop(0)

    def getsockname(self):
        return ("127.0.0.1", self.port)


def test_free_ports_skip_rays_default_ports(monkeypatch):
    monkeypatch.setattr(socket, "socket", _FakeSocket)
    _FakeSocket.ports = [44217, 41000, 8265, 41001, 41002]
    assert conftest.free_ports(3) == [41000, 41001, 41002]
    _FakeSocket.ports = [44227, 52365, 6379, 43000]
    assert conftest.free_port() == 43000


def test_free_ports_are_distinct_and_bindable():
    ports = conftest.free_ports(4)
    assert len(set(ports)) == 4 and not set(ports) & conftest.RAY_DEFAULT_PORTS
    for port in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
