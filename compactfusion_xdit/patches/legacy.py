"""The legacy yunchang path's all-to-alls (``SeqAllToAll4D``) through the compressed communicator.

``xFuserLongContextAttention`` (StepVideo, Sana) and yunchang's own ``LongContextAttention`` move
q, k, v and the output with ``SeqAllToAll4D.apply(group, x, scatter_idx, gather_idx)`` (layout
b, s, h, d), whose forward calls the module-level ``yunchang.comm.all_to_all.all_to_all_4D``. That
function builds a destination-major tensor (dim 0 = destination rank, head_dim last) and calls
``dist.all_to_all_single`` through the module's ``dist`` global.

Two replacements in ``yunchang.comm.all_to_all``, both restored by ``uninstall()``:

* ``all_to_all_4D`` is wrapped: it picks the channel key, ``("legacy", layer, role)`` -- role q, k, v
  for ``scatter_idx=2, gather_idx=1`` calls in order (with ``use_pack_qkv`` the one packed exchange is
  keyed "q"), "out" for ``scatter_idx=1, gather_idx=2``; layer counts the output exchanges since the
  step began (`patches.ulysses.ExchangeKeys`) -- and calls yunchang's function unchanged.
* the module's ``dist`` becomes a view of ``torch.distributed`` whose ``all_to_all_single`` sends
  the keyed call's bytes through ``session.comm(group).all_to_all`` (rows of head_dim values) and
  passes every other call (no key, splits, async, non-float dtypes) to torch unchanged.

yunchang's ring (``RingComm``) is compressed by `patches.legacy_ring`, applied from here. Sana's processor asks yunchang 0.6.4 for an
``AttnType.TORCH`` it does not define, so the whole legacy model path does not run without
flash-attn; the exchange itself is exercised at the function level (tests/paths/test_legacy_compression.py).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed

from compactfusion_xdit.patches import legacy_ring
from compactfusion_xdit.patches._attrs import AttributePatcher
from compactfusion_xdit.patches.ulysses import ExchangeKeys
from compactfusion_xdit.core.residual import CODED_DTYPES


class KeyedDistributed:
    """``torch.distributed`` as yunchang's all-to-all module sees it: one keyed all_to_all_single."""

    def __init__(self, session: Any) -> None:
        self._session = session
        self.pending_key: tuple | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.distributed, name)

    def all_to_all_single(self, output, input, output_split_sizes=None, input_split_sizes=None, group=None,
                          async_op=False):
        key, self.pending_key = self.pending_key, None
        plain = (key is None or output_split_sizes is not None or input_split_sizes is not None or async_op
                 or input.dtype not in CODED_DTYPES or not input.is_contiguous())
        if plain:
            return torch.distributed.all_to_all_single(output, input, output_split_sizes, input_split_sizes,
                                                       group=group, async_op=async_op)
        world = torch.distributed.get_world_size(group)
        rows = input.view(world, -1, input.shape[-1])
        received = self._session.comm(group).all_to_all(key, rows, group=group)
        output.copy_(received.view(output.shape))
        return None


def apply(patcher: AttributePatcher, session: Any) -> KeyedDistributed | None:
    """Route yunchang's SeqAllToAll4D exchanges and RingComm rings through `session` (nothing replaced
    unless it routes "legacy": compresses it, or counts raw bytes)."""
    if not session.routes("legacy"):
        return None
    legacy_ring.apply(patcher, session)
    from yunchang.comm import all_to_all as a2a_module

    original = getattr(a2a_module, "all_to_all_4D", None)
    if not callable(original) or getattr(a2a_module, "dist", None) is not torch.distributed:
        raise RuntimeError(
            "yunchang.comm.all_to_all has no all_to_all_4D using torch.distributed: this yunchang version is not "
            "supported by the legacy compression patch; use --compression-paths without legacy"
        )
    keyed = KeyedDistributed(session)
    keys = ExchangeKeys(session, "legacy")

    def all_to_all_4D(input, scatter_idx=2, gather_idx=1, group=None, use_sync=False):
        if torch.distributed.get_world_size(group) > 1:
            key = keys.output_key() if (scatter_idx, gather_idx) == (1, 2) else keys.inputs_keys(1)[0]
            keyed.pending_key = key
        try:
            return original(input, scatter_idx, gather_idx, group=group, use_sync=use_sync)
        finally:
            keyed.pending_key = None

    patcher.replace(a2a_module, "dist", keyed)
    patcher.replace(a2a_module, "all_to_all_4D", all_to_all_4D)
    return keyed
