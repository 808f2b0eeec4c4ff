"""Compressed ring attention: xfuser's ``usp.ring_attn`` replaced wholesale.

Stock xfuser 0.7.0 hands ring attention to torch's private ``_templated_ring_attention`` (all
ranks' K/V gathered, blocks merged by their log-sum-exp). The replacement keeps its arithmetic
and changes only how K/V travel: each rank codes its own K/V once per layer and the coded payload
is forwarded hop by hop around ``PROCESS_GROUP.RING_PG``
(``CompressedCommunicator.ring_exchange``), each receiver keeping one residual cache per
(layer, origin rank, k|v). The next hop is posted before a block's attention runs, so transfer
overlaps compute. Traffic is counted under path ``"ring"``.

    patcher = AttributePatcher(); apply(patcher, session)    # via patches.install(config)

Same results as stock when the ring path sends raw tensors (compression off for "ring", warm-up
steps): the raw payload is the tensors' bytes, the attention function is called the same number
of times in the same order with the same arguments (xfuser's joint-tensor decorator counts those
calls), and blocks are merged exactly as torch's ``_SDPAMerger`` does.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from compactfusion_xdit.core.residual import MessageKind
from compactfusion_xdit.patches._attrs import AttributePatcher

PATH = "ring"


def _convert_to_f32() -> bool:
    """torch's ``_cp_options.convert_to_f32`` (merge in float32), read per call like torch does."""
    try:
        from torch.distributed.tensor.experimental._attention import _cp_options
    except ImportError:  # moved in a later torch: its default
        return True
    return bool(_cp_options.convert_to_f32)


class LseMerger:
    """Merges attention blocks of the same queries by their log-sum-exp, as torch's ``_SDPAMerger``
    does without load balancing: ``out -= sigmoid(lse_b - lse) * (out - out_b)``,
    ``lse -= logsigmoid(lse - lse_b)``, in float32 when `convert_to_f32`; the result has the
    dtypes of the last block."""

    def __init__(self, convert_to_f32: bool = True) -> None:
        self.convert_to_f32 = convert_to_f32
        self.out: torch.Tensor | None = None
        self.lse: torch.Tensor | None = None
        self._squeeze_lse = False
        self._dtypes = (torch.float32, torch.float32)

    def add(self, out: torch.Tensor, lse: torch.Tensor) -> None:
        self._dtypes = (out.dtype, lse.dtype)
        if self.convert_to_f32:
            out, lse = out.to(torch.float32), lse.to(torch.float32)
        if lse.dim() < out.dim():  # lse (b, h, s) against out (b, h, s, d); cuDNN keeps the last dim
            lse = lse.unsqueeze(-1)
            self._squeeze_lse = True
        if lse.dim() != out.dim():
            raise ValueError(f"attention returned lse of shape {tuple(lse.shape)} for an output of shape {tuple(out.shape)}")
        if self.out is None:
            self.out, self.lse = out, lse
            return
        self.out = self.out - F.sigmoid(lse - self.lse) * (self.out - out)
        self.lse = self.lse - F.logsigmoid(self.lse - lse)

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.out is None:
            raise RuntimeError("no attention block was merged")
        lse = self.lse.squeeze(-1) if self._squeeze_lse else self.lse
        return self.out.to(self._dtypes[0]), lse.to(self._dtypes[1])


class LayerKeys:
    """Channel keys for successive ring attention calls: ``("ring", patch, n)``.

    ``ring_attn`` is not told which layer calls it, but every rank of a ring group runs the same
    layers in the same order, so the n-th call of a denoising step is the same layer on every rank
    and in every step. The count restarts when the session's (request, step) changes, which the
    lifecycle patch sets before each step; `patch` is PipeFusion's patch index in patch mode (-1
    otherwise), so its per-patch calls get keys of their own."""

    def __init__(self, session: Any, patch_index: Callable[[], int] = lambda: -1) -> None:
        self.session = session
        self.patch_index = patch_index
        self._marker: tuple | None = None
        self._counts: dict[int, int] = {}

    def next(self) -> tuple:
        marker = (self.session.requests, self.session.step)
        if marker != self._marker:
            self._marker = marker
            self._counts = {}
        patch = self.patch_index()
        n = self._counts.get(patch, 0)
        self._counts[patch] = n + 1
        return (PATH, patch, n)


class CompressedRingAttention:
    """Drop-in for ``usp.ring_attn(attention_function, query, key, value, ...)``.

    `ring_group` returns the ring process group (looked up per call: xfuser builds it after the
    patches are installed); `stock_ring_attn` is the original, used for ``is_causal=True``
    (the DiTs this plugin targets never ask for it; torch's causal schedule skips blocks)."""

    def __init__(self, session: Any, ring_group: Callable[[], Any], stock_ring_attn: Callable,
                 patch_index: Callable[[], int] = lambda: -1) -> None:
        self.session = session
        self.ring_group = ring_group
        self.stock_ring_attn = stock_ring_attn
        self.keys = LayerKeys(session, patch_index)

    def __call__(self, attention_function, query, key, value, dropout_p=0.0, is_causal=False,
                 joint_attn_kwargs=None, attention_kwargs=None):
        if is_causal:
            return self.stock_ring_attn(attention_function, query, key, value, dropout_p=dropout_p, is_causal=is_causal,
                                        joint_attn_kwargs=joint_attn_kwargs, attention_kwargs=attention_kwargs)
        group = self.ring_group()
        merger = LseMerger(_convert_to_f32())
        blocks = iter(self.session.comm(group).ring_exchange(self.keys.next(), (key, value), group=group))
        for _origin, (k, v) in blocks:
            out, lse, *_ = attention_function(query, k, v, is_causal=False, dropout_p=dropout_p,
                                              joint_attn_kwargs=joint_attn_kwargs, attention_kwargs=attention_kwargs)
            if lse is None:
                for _ in blocks:  # finish the ring: no message left in flight, caches advanced as on the peers
                    pass
                raise RuntimeError(
                    "ring attention needs an attention backend that returns the log-sum-exp; "
                    f"{getattr(attention_function, '__name__', attention_function)!r} returned None for it. "
                    "Choose another --attention_backend (e.g. SDPA_FLASH) or use --ulysses_degree instead of --ring_degree")
            merger.add(out, lse)
        return merger.result()[0]


class CountedRingAttention:
    """Stock ``usp.ring_attn``, unchanged, plus the bytes it moves under "ring": a session that
    codes nothing (``--compression none``) still reports what the ring costs. Every rank sends its
    K and V to the next rank once per hop, ring size - 1 hops: the messages the compressed ring
    counts as raw."""

    def __init__(self, session: Any, ring_group: Callable[[], Any], stock_ring_attn: Callable) -> None:
        self.session = session
        self.ring_group = ring_group
        self.stock_ring_attn = stock_ring_attn
        self._next: dict[Any, tuple[int]] = {}  # per group: the global rank each hop goes to

    def __call__(self, attention_function, query, key, value, *args, **kwargs):
        group = self.ring_group()
        hops = dist.get_world_size(group) - 1
        nxt = self._next.get(group)
        if nxt is None:
            ranks = dist.get_process_group_ranks(group)
            nxt = self._next[group] = (ranks[(dist.get_rank(group) + 1) % len(ranks)],)
        for t in (key, value):
            nbytes = hops * t.numel() * t.element_size()
            self.session.state.record(PATH, MessageKind.RAW, nbytes, nbytes, hops, peers=nxt)
        return self.stock_ring_attn(attention_function, query, key, value, *args, **kwargs)


def apply(patcher: AttributePatcher, session: Any) -> None:
    """Replace ``usp.ring_attn`` with `CompressedRingAttention` over ``PROCESS_GROUP.RING_PG``.

    Also when the config leaves the ring path uncompressed: the tensors then travel raw through
    the same code (bitwise the stock inputs), and the traffic is still counted under "ring". A
    session that only counts (``--compression none``) gets `CountedRingAttention`: stock's ring,
    bit for bit, with its bytes counted."""
    from xfuser.core.distributed import get_runtime_state
    from xfuser.model_executor.layers import usp

    def ring_group():
        return usp.PROCESS_GROUP.RING_PG

    def patch_index() -> int:
        state = get_runtime_state()
        return int(state.pipeline_patch_idx) if getattr(state, "patch_mode", False) else -1

    if not session.config.enabled:
        if session.routes(PATH):
            patcher.replace(usp, "ring_attn", CountedRingAttention(session, ring_group, usp.ring_attn))
        return
    patcher.replace(usp, "ring_attn", CompressedRingAttention(session, ring_group, usp.ring_attn, patch_index))
