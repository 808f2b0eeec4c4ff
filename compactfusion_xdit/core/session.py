"""`CompressionSession`: one process's compression runtime (config, residual state, communicators).

The xfuser patches hold one session; its lifecycle is driven from the denoising loop:

    session = CompressionSession(CompressionConfig.parse("residual-int4"))
    session.begin_request()                 # a new pipe(...) call: every cache dropped
    session.set_step(i)                     # before denoising step i
    y = session.comm(group).all_to_all(("ulysses", layer, "qkv"), x)
    session.stats()                         # raw/sent bytes per path, caches held
    session.end_request()                   # no cache outlives its request

Knows nothing of xfuser: process groups come from the caller.
"""

from __future__ import annotations

import os
from typing import Any

import torch.distributed as dist

from compactfusion_xdit import codecs, envs
from compactfusion_xdit.comm import CompressedCommunicator
from compactfusion_xdit.core.config import CompressionConfig
from compactfusion_xdit.core.residual import ResidualState
from compactfusion_xdit.core.scope import LinkScope, host_identity


class CompressionSession:
    """Config, the residual state shared by every path, and one communicator per process group."""

    def __init__(self, config: CompressionConfig | str | None = None, count_raw: bool = False) -> None:
        self.config = CompressionConfig.parse(config)
        #: Route the paths of ``config.paths`` through this session even where nothing is coded, so
        #: their raw bytes are counted (``--compression none`` in the ranks: raw_bytes == sent_bytes).
        self.count_raw = count_raw
        self.state = ResidualState(self.config)
        self.requests = 0
        self._comms: dict[Any, CompressedCommunicator] = {}
        # Set by the xfuser patches that drive this session (patches/lifecycle.py, patches/pipefusion.py):
        self.lifecycle: Any = None  # step tracker; holds the outcome of per-step cache checks
        self.pipefusion: Any = None  # PipeFusion channel counters and message log of the request
        if self.config.mode != "none":
            codecs.prefetch()  # compiled codec kernels load while the rank builds its model

    def comm(self, group: dist.ProcessGroup | None = None) -> CompressedCommunicator:
        """The communicator over `group` (None: the world), created once per group."""
        comm = self._comms.get(group)
        if comm is None:
            comm = self._comms[group] = CompressedCommunicator(self.state, group)
        return comm

    def begin_request(self, reset_stats: bool = False, shape: Any = None) -> None:
        """A new request: every cache dropped, step 0, the step tracker (`lifecycle`) restarted;
        with `reset_stats` its traffic is counted afresh (else stats keep accumulating); `shape`
        (the request's height, width, steps, same on every rank): auto re-measures when it changes. The one
        place a request begins: the patches, the modes and the request loops all call it."""
        if reset_stats:
            self.reset_stats()
        if self.state.scope is None and self.needs_hosts():
            self.learn_hosts()
        self.state.begin_request(shape)
        self.requests += 1
        if self.lifecycle is not None:
            self.lifecycle.begin_request()

    def needs_hosts(self) -> bool:
        """Whether this run needs every rank's host: scope ``inter-node``, or ranks on several nodes
        (torchrun's ``GROUP_WORLD_SIZE``) or named hosts (``$CFX_HOST``) for the intra/inter-node split."""
        if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() < 2:
            return False
        return (self.config.scope == "inter-node" or int(os.environ.get("GROUP_WORLD_SIZE", "1") or 1) > 1
                or bool(envs.get(envs.HOST)))

    def learn_hosts(self, identity: str | None = None) -> LinkScope:
        """Collective over the world, once (the first request does it when `needs_hosts`): every
        rank's host (`core.scope.host_identity`, or `identity`), so all ranks classify every
        exchange alike (`ResidualState.message_kind`) and stats split bytes by link class."""
        identities: list = [None] * dist.get_world_size()
        dist.all_gather_object(identities, identity or host_identity())
        self.state.scope = LinkScope.from_identities(self.config.scope, identities, dist.get_rank())
        self.state.generation += 1  # exchange plans memoise message kinds per generation
        return self.state.scope

    def end_request(self) -> None:
        """The request is over: drop every cache (none outlives its request); stats are kept."""
        self.state.reset()

    def abandon_request(self) -> None:
        """After a request failed part-way: drop every cache and the pooled wire buffers, so nothing
        of it reaches the next request (which starts with `begin_request` as usual)."""
        self.end_request()
        for comm in self._comms.values():
            comm.release_buffers()

    def reset_stats(self) -> None:
        """Count traffic and cache checks afresh."""
        self.state.reset_stats()
        if self.lifecycle is not None:
            self.lifecycle.reset_checks()

    def set_step(self, step: int) -> None:
        self.state.set_step(step)

    @property
    def step(self) -> int:
        return self.state.step

    def compresses(self, path: str) -> bool:
        return self.config.compresses(path)

    def routes(self, path: str) -> bool:
        """Whether the exchanges of `path` go through this session: it compresses them, or it
        counts raw traffic (`count_raw`) and `path` is one of the config's paths."""
        return self.compresses(path) or (self.count_raw and path in self.config.paths)

    def stats(self) -> dict[str, Any]:
        return {**self.state.stats(), "requests": self.requests}

    def check_caches(self, group: dist.ProcessGroup | None = None) -> list[str]:
        """Mismatching sender/receiver caches across `group` (empty list: all bitwise equal)."""
        return self.comm(group).cache_mismatches(group)
