"""What every exchange of the communicator shares: channel keys, side-message tags, finite checks
and the pooled wire buffers."""

from __future__ import annotations

from typing import Hashable, Sequence

import torch

#: Side messages (raw fallbacks) use the caller's tag plus this, so they never match a payload.
FALLBACK_TAG_OFFSET = 1 << 20


def link_key(key: Hashable, *ends: Hashable) -> tuple:
    """The channel key of one link: the caller's key (a tuple) extended with its ends."""
    if not isinstance(key, tuple):
        raise ValueError(f"channel key must be a tuple starting with a path name, got {key!r}")
    return (*key, *ends)


def finite_rows(x2: torch.Tensor) -> list[bool]:
    """`residual.is_finite` per row of a 2-D tensor, with one host sync."""
    return torch.isfinite(x2.sum(dim=1, dtype=torch.float32)).tolist()


def finite_rows_each(tensors: Sequence[torch.Tensor], rows: int) -> list[list[bool]]:
    """`finite_rows` of each tensor viewed as `rows` rows, with one host sync for all of them."""
    sums = torch.stack([t.reshape(rows, -1).sum(dim=1, dtype=torch.float32) for t in tensors])
    return torch.isfinite(sums).tolist()


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
