"""Rendezvous port checks for the launchers (``xfuser``, ``cfx-xdit``).

torchrun's agent on node 0 listens on ``--master_port``; when another process holds it the ranks
fail late with a long traceback. The launchers check first: a port the user named that is taken
is one clear error (with a free port to use instead); no port named means a free one is picked.
"""

from __future__ import annotations

import errno
import socket


class PortInUse(ValueError):
    """The ``--master_port`` the user asked for is taken on this machine."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_free(port: int) -> bool:
    """Whether a listener could bind `port` on every interface of this machine now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("", port))
        except OSError as err:
            if err.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def check_master_port(port: int | None, node_rank: int = 0) -> None:
    """Raise `PortInUse` when `port` was given, this is node 0 (where torchrun listens), and it is taken."""
    if port is None or node_rank != 0:
        return
    if not 0 < port < 65536:
        raise PortInUse(f"--master_port {port} is not a TCP port (1-65535)")
    if not is_free(port):
        raise PortInUse(f"--master_port {port} is already in use on this machine; pass a free port "
                        f"(e.g. --master_port {free_port()}) or leave --master_port out to pick one")
