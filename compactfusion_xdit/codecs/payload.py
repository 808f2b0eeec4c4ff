"""`Payload`: what one coded tensor puts on the wire; `check_base`: a residual cache matches its tensor."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Payload:
    """What one coded tensor puts on the wire: `tensors` in wire order (packed data, then scales).

    `shape` and `dtype` are those of the coded 2-D tensor; `codec` is the codec's name.
    """

    tensors: tuple
    shape: tuple
    dtype: torch.dtype
    codec: str

    @property
    def nbytes(self) -> int:
        """Exact bytes on the wire (equals ``flatten().numel()``)."""
        return sum(t.numel() * t.element_size() for t in self.tensors)

    def flatten(self) -> torch.Tensor:
        """All tensors' bytes, concatenated in wire order, as one uint8 tensor."""
        return torch.cat([t.contiguous().reshape(-1).view(torch.uint8) for t in self.tensors])


def check_base(x: torch.Tensor, base: torch.Tensor) -> None:
    """A residual cache must match the tensor it codes; the message says how to recover."""
    if base.shape != x.shape or base.dtype != x.dtype or base.device != x.device:
        raise ValueError(
            f"base cache {tuple(base.shape)} {base.dtype} on {base.device} does not match x "
            f"{tuple(x.shape)} {x.dtype} on {x.device}; reset the channel's cache"
        )
