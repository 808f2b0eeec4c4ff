"""Let xfuser's UNet pipelines (SDXL) run on more ranks than its 2-rank CFG split.

xfuser 0.7.0 builds a ``UnetRuntimeState`` (``xfuser.core.distributed.runtime_state``) for any
pipeline with a ``unet``; its ``sanity_check`` refuses every world but one rank or exactly CFG 2 on
2 ranks. Patch parallelism presents its bands to xfuser as data-parallel ranks
(`compactfusion_xdit.modes.layout`), so the world is ``cfg x data``: the replacement accepts that
(sequence, PipeFusion and tensor parallel degrees must still be 1, which xfuser's SDXL wrapper
cannot run) and leaves the refusal of anything else to xfuser's own message.
"""

from __future__ import annotations

from typing import Any


def apply(patcher: Any) -> None:
    """Replace ``UnetRuntimeState.sanity_check`` (recorded in `patcher`)."""
    from xfuser.core.distributed import runtime_state

    cls = runtime_state.UnetRuntimeState
    original = cls.sanity_check

    def sanity_check(self) -> None:
        config = self.parallel_config
        if config.sp_degree == config.pp_degree == config.tp_degree == 1 and config.cfg_degree in (1, 2):
            return  # cfg x data ranks
        original(self)

    patcher.replace(cls, "sanity_check", sanity_check)
