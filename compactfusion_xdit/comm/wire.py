"""What every exchange of the communicator shares: channel keys, peer ranges and the pooled wire
buffers."""

from __future__ import annotations

from typing import Hashable

import torch

def link_key(key: Hashable, *ends: Hashable) -> tuple:
    """The channel key of one link: the caller's key (a tuple) extended with its ends."""
    if not isinstance(key, tuple):
        raise ValueError(f"channel key must be a tuple starting with a path name, got {key!r}")
    return (*key, *ends)


def peer_ranges(world: int, me: int) -> list[tuple[int, int, int]]:
    """The peers of group rank `me` as contiguous ranges ``(lo, hi, at)``: ranks lo..hi-1, whose
    per-peer stack (own rank left out) starts at index `at`. At most two: before and after me."""
    ranges = []
    if me > 0:
        ranges.append((0, me, 0))
    if me < world - 1:
        ranges.append((me + 1, world, me))
    return ranges


class BufferPool:
    """Wire buffers (uint8) reused per (key, role); rebuilt when the shape or device changes."""

    def __init__(self) -> None:
        self._buffers: dict[tuple, torch.Tensor] = {}

    def get(self, key: Hashable, role: str, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        slot = (key, role)
        buf = self._buffers.get(slot)
        if buf is None or tuple(buf.shape) != tuple(shape) or buf.device != device:
            buf = self._buffers[slot] = torch.empty(shape, dtype=torch.uint8, device=device)
        return buf

    def release(self) -> None:
        self._buffers.clear()
