"""`CompressionSession`: one process's compression runtime (config, residual state, communicators).

The xfuser patches hold one session; its lifecycle is driven from the denoising loop:

    session = CompressionSession(CompressionConfig.parse("residual-int4"))
    session.begin_request()                 # a new pipe(...) call: every cache dropped
    session.set_step(i)                     # before denoising step i
    y = session.comm(group).all_to_all(("ulysses", layer, "qkv"), x)
    session.stats()                         # raw/sent bytes per path, caches held

Knows nothing of xfuser: process groups come from the caller.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist

from compactfusion_xdit.comm import CompressedCommunicator
from compactfusion_xdit.config import CompressionConfig
from compactfusion_xdit.residual import ResidualState


class CompressionSession:
    """Config, the residual state shared by every path, and one communicator per process group."""

    def __init__(self, config: CompressionConfig | str | None = None) -> None:
        self.config = CompressionConfig.parse(config)
        self.state = ResidualState(self.config)
        self.requests = 0
        self._comms: dict[Any, CompressedCommunicator] = {}
        # Set by the xfuser patches that drive this session (patches/lifecycle.py, patches/pipefusion.py):
        self.lifecycle: Any = None  # step tracker; holds the outcome of per-step cache checks
        self.pipefusion: Any = None  # PipeFusion channel counters and message log of the request

    def comm(self, group: dist.ProcessGroup | None = None) -> CompressedCommunicator:
        """The communicator over `group` (None: the world), created once per group."""
        comm = self._comms.get(group)
        if comm is None:
            comm = self._comms[group] = CompressedCommunicator(self.state, group)
        return comm

    def begin_request(self) -> None:
        """A new request: drop every cache and start at step 0 (stats keep accumulating)."""
        self.state.begin_request()
        self.requests += 1

    def abandon_request(self) -> None:
        """After a request failed part-way: drop every cache and the pooled wire buffers, so nothing
        of it reaches the next request (which starts with `begin_request` as usual)."""
        self.state.reset()
        for comm in self._comms.values():
            comm.release_buffers()

    def set_step(self, step: int) -> None:
        self.state.set_step(step)

    @property
    def step(self) -> int:
        return self.state.step

    def compresses(self, path: str) -> bool:
        return self.config.compresses(path)

    def stats(self) -> dict[str, Any]:
        return {**self.state.stats(), "requests": self.requests}

    def check_caches(self, group: dist.ProcessGroup | None = None) -> list[str]:
        """Mismatching sender/receiver caches across `group` (empty list: all bitwise equal)."""
        return self.comm(group).cache_mismatches(group)
