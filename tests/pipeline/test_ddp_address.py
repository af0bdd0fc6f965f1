"""The gloo address check a multi-node CPU run makes on every node (`pipeline.ddp_address`)."""

from __future__ import annotations

import socket

import pytest

from pipeline.ddp_address import gloo_address_problem


def test_an_interface_that_exists_passes_and_a_missing_one_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    assert gloo_address_problem() is None
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo,fpn-nosuch9")
    problem = gloo_address_problem()
    assert problem is not None and problem.startswith(
        "GLOO_SOCKET_IFNAME=lo,fpn-nosuch9: no interface fpn-nosuch9"
    )


def test_a_hostname_on_loopback_is_refused_and_one_on_a_bindable_address_passes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    monkeypatch.setattr(socket, "gethostname", lambda: "node-a")
    monkeypatch.setattr(socket, "gethostbyname", lambda host: "127.0.1.1")  # Debian's /etc/hosts line
    problem = gloo_address_problem()
    assert problem is not None and "its hostname node-a resolves to 127.0.1.1" in problem
    assert "GLOO_SOCKET_IFNAME" in problem
    monkeypatch.setattr(socket, "gethostbyname", lambda host: "192.0.2.77")  # not this machine's (TEST-NET-1)
    problem = gloo_address_problem()
    assert problem is not None and "does not resolve to an address of this node" in problem
    addresses = [a for a in _own_addresses() if not a.startswith("127.")]
    if not addresses:
        pytest.skip("this machine has no non-loopback IPv4 address to resolve to")
    monkeypatch.setattr(socket, "gethostbyname", lambda host: addresses[0])
    assert gloo_address_problem() is None


def _own_addresses() -> list[str]:
    import psutil

    return [
        a.address for addrs in psutil.net_if_addrs().values() for a in addrs if a.family == socket.AF_INET
    ]
