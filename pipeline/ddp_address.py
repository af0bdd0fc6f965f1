"""Which address CPU DDP (gloo) listens on, checked on a node before a multi-node run.

Gloo, torch's CPU backend, picks the address each rank advertises to the others from
``GLOO_SOCKET_IFNAME`` (a network interface) or, without it, from the node's hostname: the
address it resolves to, when this machine can bind it, else the loopback address (torch warns
once, in the worker's log). A node whose hostname resolves to a loopback address (Debian's
``127.0.1.1`` line in ``/etc/hosts``) or to an address that is not its own then advertises
``127.0.0.1``, and the other nodes' ranks fail after gloo's timeout with "connectFullMesh
failed ... Connection refused, remote=[127.0.0.1]". `gloo_address_problem` finds that before
any training. NCCL (GPUs) picks its interfaces itself, skipping loopback.
"""

from __future__ import annotations

import ipaddress
import os
import socket

GLOO_HINT = (
    "set GLOO_SOCKET_IFNAME=<the interface of the cluster network> in the environment of `ray start` "
    "on that node, or make its hostname resolve to its cluster address"
)


def gloo_address_problem() -> str | None:
    """What would make gloo advertise an address other nodes cannot reach, from here; None if nothing."""
    interface = os.environ.get("GLOO_SOCKET_IFNAME", "").strip()
    if interface:
        missing = [name for name in interface.split(",") if name not in {n for _, n in socket.if_nameindex()}]
        if missing:
            return f"GLOO_SOCKET_IFNAME={interface}: no interface {', '.join(missing)} on this node ({GLOO_HINT})"
        return None
    host = socket.gethostname()
    try:
        address = socket.gethostbyname(host)
        with socket.socket() as sock:
            sock.bind((address, 0))
    except OSError as err:
        return f"its hostname {host} does not resolve to an address of this node ({err}): CPU DDP (gloo) would listen on 127.0.0.1 ({GLOO_HINT})"
    if ipaddress.ip_address(address).is_loopback:
        return f"its hostname {host} resolves to {address}: CPU DDP (gloo) would listen on a loopback address ({GLOO_HINT})"
    return None
