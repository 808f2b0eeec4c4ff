"""yunchang's ring (``RingComm``) through the compressed communicator: the legacy ring path.

Every ring attention forward of yunchang 0.6.4 (``ring_flash_attn_forward``, the zigzag, stripe,
varlen and pytorch variants) and of xfuser 0.7.0's ``xFuserLongContextAttention``
(``xdit_ring_flash_attn_forward``, ``xdit_sana_ring_flash_attn_forward``) builds one
``RingComm(group)`` per call and drives it the same way::

    for step in range(world):
        if step + 1 != world:
            next_k = comm.send_recv(k); next_v = comm.send_recv(v); comm.commit()
        ... attend over k, v ...
        if step + 1 != world:
            comm.wait(); k, v = next_k, next_v

so the tensors sent at hop s > 0 are exactly the ones received at hop s - 1. `CompressedRingComm`
keeps that interface: at the first commit it codes the rank's own tensors once
(`CompressedCommunicator.ring_exchange`), and every later hop forwards the payload it received
instead of re-coding a reconstruction. Each rank keeps one residual state per (layer, origin rank,
tensor). The key is ``("legacy", layer, "ring")``; layer counts ring calls since the step began.

The ``RingComm`` name is replaced in each module that imported it, by a factory that returns the
compressed ring for forward functions and yunchang's own class for backward ones (gradients are not
activations: training keeps the stock exchange). A module whose ``RingComm`` is not yunchang's class
(xfuser binds ``object`` there without CUDA) is left alone.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import torch
import torch.distributed as dist

from compactfusion_xdit.patches._attrs import AttributePatcher
from compactfusion_xdit.patches.ulysses import ExchangeKeys

RING_MODULES = (
    "yunchang.ring.ring_flash_attn",
    "yunchang.ring.ring_pytorch_attn",
    "yunchang.ring.zigzag_ring_flash_attn",
    "yunchang.ring.stripe_flash_attn",
    "yunchang.ring.ring_flash_attn_varlen",
    "yunchang.ring.zigzag_ring_flash_attn_varlen",
    "yunchang.ring.ring_npu_flash_attn",
    "yunchang.ring.ring_flashinfer_attn",
    "xfuser.core.long_ctx_attention.ring.ring_flash_attn",
)


class RingProtocolError(RuntimeError):
    """The caller drove the ring in a way the compressed ring cannot forward without re-coding."""


class CompressedRingComm:
    """Drop-in for yunchang's ``RingComm`` (send_recv / commit / wait) carrying residual payloads."""

    def __init__(self, session: Any, key: tuple, process_group: dist.ProcessGroup | None) -> None:
        self._session = session
        self._key = key
        self._process_group = process_group if process_group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self._process_group)
        self.world_size = dist.get_world_size(self._process_group)
        ranks = dist.get_process_group_ranks(self._process_group)
        self.send_rank = ranks[(self.rank + 1) % self.world_size]
        self.recv_rank = ranks[(self.rank - 1) % self.world_size]
        self._to_send: list[torch.Tensor] = []
        self._results: list[torch.Tensor] = []
        self._received: list[torch.Tensor] | None = None  # what the last wait() filled in
        self._hops = None
        self._committed = False

    def send_recv(self, to_send: torch.Tensor, recv_tensor: torch.Tensor | None = None) -> torch.Tensor:
        result = torch.empty_like(to_send) if recv_tensor is None else recv_tensor
        self._to_send.append(to_send)
        self._results.append(result)
        return result

    def commit(self) -> None:
        if self._committed:
            raise RuntimeError("commit called twice")
        if self._hops is None:
            exchange = self._session.comm(self._process_group).ring_exchange(
                self._key, self._to_send, group=self._process_group)
            self._hops = iter(exchange)
            next(self._hops)  # hop 0 is the rank's own tensors
        elif self._received is None or len(self._to_send) != len(self._received) or any(
                sent is not got for sent, got in zip(self._to_send, self._received)):
            raise RingProtocolError(
                f"ring {self._key}: a later hop sent tensors other than the ones the previous hop received; "
                "the compressed ring can only forward what it received. Run without the legacy path "
                "(--compression-paths without legacy).")
        self._committed = True

    def wait(self) -> None:
        if not self._committed:
            raise RuntimeError("wait called before commit")
        _, tensors = next(self._hops)
        for result, tensor in zip(self._results, tensors):
            if result.data_ptr() != tensor.data_ptr():
                result.copy_(tensor)
        self._received = self._results
        self._to_send, self._results = [], []
        self._committed = False


def _called_from_backward() -> bool:
    return "backward" in sys._getframe(2).f_code.co_name


def apply(patcher: AttributePatcher, session: Any) -> list[str]:
    """Replace ``RingComm`` in every loaded ring module (names of the modules patched)."""
    try:
        from yunchang.ring.utils import RingComm as stock
    except ImportError:
        return []
    keys = ExchangeKeys(session, "legacy-ring")

    def ring_comm(process_group=None):
        if _called_from_backward() or dist.get_world_size(process_group) == 1:
            return stock(process_group)
        _, layer, _ = keys.output_key()
        return CompressedRingComm(session, ("legacy", layer, "ring"), process_group)

    # yunchang's own name first: a ring module imported later (one that cannot import now, say)
    # binds the compressed class, so no ring runs stock and uncounted
    utils = sys.modules["yunchang.ring.utils"]
    patcher.replace(utils, "RingComm", ring_comm)
    patched = []
    for name in RING_MODULES:
        try:
            module = sys.modules.get(name) or importlib.import_module(name)
        except ImportError:  # optional kernels (flashinfer, NPU) absent: it binds ours if it ever imports
            continue
        if getattr(module, "RingComm", None) is stock:
            patcher.replace(module, "RingComm", ring_comm)
            patched.append(name)
    return patched
