"""Free TCP ports on this host, for the servers the pipeline starts (a local Ray head, MLflow)."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on at ``host`` now: the kernel's pick for a bind to port 0.

    Another process may take it before the caller binds, so a caller that starts a server on it
    retries with a new port when the start fails for that reason.
    """
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])
