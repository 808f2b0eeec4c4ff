"""Bounded waits for every process group, including those xfuser creates without a timeout.

xfuser's ``GroupCoordinator`` calls ``torch.distributed.new_group(ranks, backend=...)`` with no
timeout, so its groups (Ulysses, ring, PipeFusion, ...) get torch's defaults: 30 minutes for gloo,
10 for NCCL. ``new_group`` reads those defaults from module globals of
``torch.distributed.distributed_c10d`` at call time; `apply` replaces them, so a peer that stops
responding fails a collective after `seconds` instead of the defaults. (A peer that dies fails
gloo collectives at once: its sockets close.)
"""

from __future__ import annotations

from datetime import timedelta

from compactfusion_xdit.patches._attrs import AttributePatcher


def apply(patcher: AttributePatcher, seconds: float) -> None:
    """Make `seconds` the default timeout of every process group created from now on."""
    from torch.distributed import distributed_c10d

    timeout = timedelta(seconds=seconds)
    patcher.replace(distributed_c10d, "default_pg_timeout", timeout)
    if isinstance(getattr(distributed_c10d, "default_pg_nccl_timeout", None), timedelta):
        patcher.replace(distributed_c10d, "default_pg_nccl_timeout", timeout)
