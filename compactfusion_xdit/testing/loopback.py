"""A one-process stand-in for a process group: every peer "sends" what this rank sends.

`loopback(world, me)` replaces the torch.distributed calls the communicator makes with local
copies (an all-to-all delivers each destination block back as if it came from that peer; a
point-to-point receive gets the oldest message this rank sent with the same tag) and counts them, and counts the host synchronisations the code under test asks for (``item``,
``tolist``, ``bool``/``int``/``float`` of a tensor, ``numpy``). With no transport in the way, a
timed loop measures the plugin's own cost per exchange, and a test can assert how many
collectives and host reads one exchange makes.

    with loopback(world=2, me=0) as counts:
        comm.all_to_all_many(keys, xs, group=counts.group)
    assert counts.collectives == 1 and counts.host_syncs == 0
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.distributed as dist

_SYNCS = ("item", "tolist", "__bool__", "__int__", "__float__", "numpy")


@dataclass
class _P2POp:
    """What `dist.P2POp` holds, without its checks against a registered group."""

    op: object
    tensor: torch.Tensor
    peer: int | None = None
    group: object = None
    tag: int = 0


class _Done:
    def wait(self, *args) -> bool:
        return True

    def is_completed(self) -> bool:
        return True


@dataclass
class LoopbackCounts:
    """What ran inside `loopback`: collectives by name, host syncs; `group` to pass to the calls."""

    group: object
    calls: dict[str, int] = field(default_factory=dict)
    host_syncs: int = 0

    @property
    def collectives(self) -> int:
        return sum(self.calls.values())

    def reset(self) -> None:
        self.calls.clear()
        self.host_syncs = 0


@contextlib.contextmanager
def loopback(world: int = 2, me: int = 0) -> Iterator[LoopbackCounts]:
    """Patch torch.distributed for a `world`-rank group in which this process is rank `me` and
    every peer mirrors it; yields the counts. Not thread-safe; restores everything on exit."""
    group = object()
    counts = LoopbackCounts(group)
    saved_isend = dist.isend

    def counted(name, fn):
        def call(*args, **kwargs):
            counts.calls[name] = counts.calls.get(name, 0) + 1
            fn(*args, **kwargs)
            return _Done() if kwargs.get("async_op") else None
        return call

    def all_to_all_single(out, x, *args, **kwargs):
        out.copy_(x)  # block d comes "from" peer d, which sent what this rank sent

    def all_gather_into_tensor(out, x, *args, **kwargs):
        out.copy_(x.expand_as(out))

    mailbox: dict[int, list[torch.Tensor]] = {}  # tag -> tensors sent, oldest first

    def batch_isend_irecv(ops):
        counts.calls["batch_isend_irecv"] = counts.calls.get("batch_isend_irecv", 0) + 1
        for op in ops:
            if op.op is saved_isend:
                mailbox.setdefault(op.tag, []).append(op.tensor.clone())
        for op in ops:
            if op.op is not saved_isend:
                op.tensor.copy_(mailbox[op.tag].pop(0))  # a peer sent this rank's own message
        return [_Done() for _ in ops]

    patched = {
        "all_to_all_single": counted("all_to_all_single", all_to_all_single),
        "all_gather_into_tensor": counted("all_gather_into_tensor", all_gather_into_tensor),
        "broadcast": counted("broadcast", lambda *a, **k: None),
        "batch_isend_irecv": batch_isend_irecv,
        "P2POp": _P2POp,
        "get_process_group_ranks": lambda g: list(range(world)),
        "get_rank": lambda g=None: me,
        "get_world_size": lambda g=None: world,
    }
    saved = {name: getattr(dist, name) for name in patched}
    real = {name: getattr(torch.Tensor, name) for name in _SYNCS}

    def syncing(name):
        def call(self, *args, **kwargs):
            counts.host_syncs += 1
            return real[name](self, *args, **kwargs)
        return call

    try:
        for name, fn in patched.items():
            setattr(dist, name, fn)
        for name in _SYNCS:
            setattr(torch.Tensor, name, syncing(name))
        yield counts
    finally:
        for name, fn in saved.items():
            setattr(dist, name, fn)
        for name, fn in real.items():
            setattr(torch.Tensor, name, fn)
