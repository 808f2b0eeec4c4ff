"""Every environment variable the plugin reads, with its default and meaning (like xDiT's ``envs.py``).

    from compactfusion_xdit import envs
    envs.get(envs.COMPRESSION)        # "" when unset

| variable | read by | meaning |
|---|---|---|
| ``CFX_COMPRESSION`` | `launch`, Ray workers (`ray_support`), `api.install_from_env` | compression of processes a launcher starts (default none) |
| ``CFX_CACHE`` | `models.tiny`, `models.tiny_more` | where built-in models are built (default ``~/.cache/compactfusion_xdit``) |
| ``CFX_COMM_TIMEOUT_S`` | `reliability.liveness` | seconds a collective may wait before the rank gives up (default 600) |
| ``CFX_DEBUG`` | `rank.serving` (both rank programs), `cli.torchrun` | ``1``: show tracebacks and torchrun's own report instead of one-line errors |
| ``CFX_FAULT`` | `reliability.faults` | inject a failure at a scheduler step (tests), e.g. ``exit:1:3`` |
| ``CFX_CPU_KERNELS`` | `codecs` | ``0``: code on CPU with the torch reference, not the compiled numba kernels (`codecs.cpu`, on by default once compiled) |
| ``CFX_FORCE_TORCH`` | `codecs` | ``1``: use the torch reference codecs even where fused kernels exist |
| ``CFX_AUTO_LINK_MBPS`` | `core.auto` | replaces the link throughput ``--compression auto`` measures, MB/s (tests, what-if runs): ``0.01`` or ``ulysses=0.01,ring=1e6`` |
| ``CFX_HOST`` | `core.scope` | names this rank's host for ``--compression-scope inter-node`` and the intra/inter-node byte split (default: hostname and the address of the group's interface); ranks with the same value count as one node |
| ``CFX_PEERS_FILE`` | `reliability.liveness`, `cli.torchrun` | set by the launchers: where each node's local rank 0 writes every rank's liveness address, so the launcher can name lost peers a rank could not (NCCL's watchdog) |
| ``CFX_LAUNCHER_PID`` | `reliability.orphans` | set by the launchers for torchrun and its ranks; a rank started after the launcher died exits at once |
"""

from __future__ import annotations

import os

COMPRESSION = "CFX_COMPRESSION"
CACHE = "CFX_CACHE"
COMM_TIMEOUT_S = "CFX_COMM_TIMEOUT_S"
DEBUG = "CFX_DEBUG"
FAULT = "CFX_FAULT"
FORCE_TORCH = "CFX_FORCE_TORCH"
CPU_KERNELS = "CFX_CPU_KERNELS"
LAUNCHER_PID = "CFX_LAUNCHER_PID"
AUTO_LINK_MBPS = "CFX_AUTO_LINK_MBPS"
HOST = "CFX_HOST"
PEERS_FILE = "CFX_PEERS_FILE"

ALL = (COMPRESSION, CACHE, COMM_TIMEOUT_S, DEBUG, FAULT, FORCE_TORCH, CPU_KERNELS, LAUNCHER_PID, AUTO_LINK_MBPS, HOST, PEERS_FILE)


def get(name: str) -> str:
    """The variable's value, "" when unset."""
    return os.environ.get(name, "")


def flag(name: str) -> bool:
    """True when the variable is set to anything but "" or "0"."""
    return get(name) not in ("", "0")
