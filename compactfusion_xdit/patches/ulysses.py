"""Ulysses all-to-alls of ``xfuser.model_executor.layers.usp`` through the compressed communicator.

xfuser moves every Ulysses tensor with ``usp._sdpa_all_to_all_single(x)`` (dim 0 of x split into
one chunk per destination rank, ``PROCESS_GROUP.ULYSSES_PG``), called from four module-level
functions that ``USP`` looks up as globals at call time:

    _ft_c_input_all_to_all(x)                  q, k, v (and extra inputs) one at a time
    _combined_qkv_all_to_all(q, k, v, *extra)  Flux: packed as [P, n, b, h/P, s, d]
    _combined_gqa_qkv_all_to_all(q, k, v, ...) GQA: per-tensor chunks concatenated per destination
    _ft_c_output_all_to_all(out)               the attention output back to sequence shards

Each of the four is wrapped: the wrapper names the roles (q, k, v, extra<i>, out) of the bytes the
next ``_sdpa_all_to_all_single`` call moves and calls xfuser's own function, whose permutes and
reshapes stay xfuser's. ``_sdpa_all_to_all_single`` is replaced by a version that, when roles are
named, sends each role's slice of every destination chunk through
``session.comm(ULYSSES_PG).all_to_all`` (rows of head_dim values, so codec scales are per token and
head) and otherwise calls xfuser's function unchanged.

Channel keys are ``("ulysses", layer, role)``: ``layer`` counts the attention calls (output
exchanges) since the current step began, so it is the same on every rank of the group (they run
the same collectives in the same order) and the same layer at every step. The count restarts
when ``(session.requests, session.step)`` changes (see ``patches.lifecycle``).

Pass-through: tensors the codecs do not code (FP8 with ``--use_fp8_comms``, integers) go through
xfuser's functions untouched; nothing is replaced unless the session routes "ulysses" (it compresses
the path, or counts raw bytes with ``--compression none``: every message then travels raw, bitwise
the stock exchange).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from compactfusion_xdit.patches._attrs import AttributePatcher
from compactfusion_xdit.core.residual import CODED_DTYPES

#: Names of the wrapped functions in ``xfuser.model_executor.layers.usp``.
WRAPPED = ("_ft_c_input_all_to_all", "_combined_qkv_all_to_all", "_combined_gqa_qkv_all_to_all", "_ft_c_output_all_to_all")
INPUT_ROLES = ("q", "k", "v")


def input_role(index: int) -> str:
    """Role of the index-th input tensor of one attention call: q, k, v, then extra0, extra1, ..."""
    return INPUT_ROLES[index] if index < len(INPUT_ROLES) else f"extra{index - len(INPUT_ROLES)}"


class ExchangeKeys:
    """Channel keys of one path's per-layer exchanges in the current step: (path, layer, role).

    `layer` counts the output exchanges since the step began; it restarts whenever
    ``(session.requests, session.step)`` changes."""

    def __init__(self, session: Any, path: str = "ulysses") -> None:
        self.session = session
        self.path = path
        self._epoch: tuple[int, int] | None = None
        self.layer = 0
        self.inputs = 0  # input tensors exchanged for the current layer so far

    def _sync(self) -> None:
        epoch = (self.session.requests, self.session.step)
        if epoch != self._epoch:
            self._epoch, self.layer, self.inputs = epoch, 0, 0

    def inputs_keys(self, count: int) -> list[tuple]:
        """Keys of the next `count` input tensors of the current layer."""
        self._sync()
        keys = [(self.path, self.layer, input_role(self.inputs + i)) for i in range(count)]
        self.inputs += count
        return keys

    def output_key(self, role: str = "out") -> tuple:
        """Key of the current layer's output; the next exchange belongs to the next layer."""
        self._sync()
        key = (self.path, self.layer, role)
        self.layer += 1
        self.inputs = 0
        return key


class UlyssesExchange:
    """The replacement `_sdpa_all_to_all_single` and the wrappers that name its roles."""

    def __init__(self, session: Any, usp: Any, originals: dict[str, Any]) -> None:
        self.session = session
        self.usp = usp
        self.originals = originals
        self.keys = ExchangeKeys(session, "ulysses")
        # (key, elements per destination chunk, row width) for the next _sdpa_all_to_all_single call
        self._roles: list[tuple[tuple, int, int]] | None = None

    # ----- the all-to-all ---------------------------------------------------------------------
    def all_to_all_single(self, x: torch.Tensor) -> torch.Tensor:
        roles, self._roles = self._roles, None
        if roles is None:
            return self.originals["_sdpa_all_to_all_single"](x)
        group = self.usp.PROCESS_GROUP.ULYSSES_PG
        comm = self.session.comm(group)
        world = torch.distributed.get_world_size(group)
        per_dest = x.numel() // world
        if sum(n for _, n, _ in roles) != per_dest:
            raise RuntimeError(f"Ulysses exchange of {tuple(x.shape)} does not split into the roles {roles}")
        chunks = x.contiguous().view(world, per_dest)
        if len(roles) == 1:
            (key, n, width), = roles
            return comm.all_to_all(key, chunks.view(world, n // width, width), group=group).view(x.shape)
        parts, offset = [], 0
        for _, n, width in roles:
            parts.append(chunks[:, offset:offset + n].reshape(world, n // width, width))
            offset += n
        received = comm.all_to_all_many([key for key, _, _ in roles], parts, group=group)  # one collective
        return torch.cat([r.view(world, -1) for r in received], dim=1).view(x.shape)

    def _exchange(self, name: str, roles: Sequence[tuple[tuple, int, int]], *args):
        self._roles = list(roles)
        try:
            return self.originals[name](*args)
        finally:
            self._roles = None

    # ----- wrappers ---------------------------------------------------------------------------
    def _passes_through(self, tensors: Sequence[torch.Tensor]) -> bool:
        return self.usp.get_ulysses_parallel_world_size() <= 1 or any(t.dtype not in CODED_DTYPES for t in tensors)

    def input_all_to_all(self, x):
        if self.usp.get_ulysses_parallel_world_size() > 1:
            (key,) = self.keys.inputs_keys(1)
            if x.dtype in CODED_DTYPES:
                world = self.usp.get_ulysses_parallel_world_size()
                return self._exchange("_ft_c_input_all_to_all", [(key, x.numel() // world, x.shape[-1])], x)
        return self.originals["_ft_c_input_all_to_all"](x)

    def combined_qkv_all_to_all(self, q, k, v, *extra):
        tensors = (q, k, v, *extra)
        if self.usp.get_ulysses_parallel_world_size() > 1:
            keys = self.keys.inputs_keys(len(tensors))
            if not self._passes_through(tensors):
                world = self.usp.get_ulysses_parallel_world_size()
                # packed [P, n, b, h/P, s, d]: per destination, role j is the j-th block of q.numel()/P
                roles = [(key, q.numel() // world, q.shape[-1]) for key in keys]
                return self._exchange("_combined_qkv_all_to_all", roles, *tensors)
        return self.originals["_combined_qkv_all_to_all"](*tensors)

    def combined_gqa_qkv_all_to_all(self, q, k, v, *extra):
        tensors = (q, k, v, *extra)
        if self.usp.get_ulysses_parallel_world_size() > 1:
            keys = self.keys.inputs_keys(len(tensors))
            if not self._passes_through(tensors):
                world = self.usp.get_ulysses_parallel_world_size()
                # per destination: each tensor's [h/P, b, s, d] chunk, concatenated in order
                roles = [(key, t.numel() // world, t.shape[-1]) for key, t in zip(keys, tensors)]
                return self._exchange("_combined_gqa_qkv_all_to_all", roles, *tensors)
        return self.originals["_combined_gqa_qkv_all_to_all"](*tensors)

    def output_all_to_all(self, x):
        if self.usp.get_ulysses_parallel_world_size() > 1:
            key = self.keys.output_key()
            if x.dtype in CODED_DTYPES:
                world = self.usp.get_ulysses_parallel_world_size()
                return self._exchange("_ft_c_output_all_to_all", [(key, x.numel() // world, x.shape[-1])], x)
        return self.originals["_ft_c_output_all_to_all"](x)


def apply(patcher: AttributePatcher, session: Any) -> UlyssesExchange | None:
    """Route xfuser's Ulysses all-to-alls through `session` (nothing replaced unless it routes "ulysses")."""
    if not session.routes("ulysses"):
        return None
    from xfuser.model_executor.layers import usp

    names = ("_sdpa_all_to_all_single", *WRAPPED)
    missing = [n for n in names if not callable(getattr(usp, n, None))]
    if missing:
        raise RuntimeError(
            f"xfuser.model_executor.layers.usp has no {', '.join(missing)}: this xfuser version is not supported "
            f"by the Ulysses compression patch; use --compression-paths without ulysses or --compression none"
        )
    exchange = UlyssesExchange(session, usp, {n: getattr(usp, n) for n in names})
    patcher.replace(usp, "_sdpa_all_to_all_single", exchange.all_to_all_single)
    patcher.replace(usp, "_ft_c_input_all_to_all", exchange.input_all_to_all)
    patcher.replace(usp, "_combined_qkv_all_to_all", exchange.combined_qkv_all_to_all)
    patcher.replace(usp, "_combined_gqa_qkv_all_to_all", exchange.combined_gqa_qkv_all_to_all)
    patcher.replace(usp, "_ft_c_output_all_to_all", exchange.output_all_to_all)
    return exchange
