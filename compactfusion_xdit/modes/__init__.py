"""Parallel modes the plugin adds to xfuser: patch parallelism (DistriFusion, ``--patch_parallel_degree``)
and step parallelism (ParaStep, ``--step_parallel_degree``). Both can carry residual-compressed traffic.

The worker checks the flags (`layout.check`), gives xfuser the modes' factor as extra data-parallel
degree (`layout.xfuser_data_parallel_degree`), and after the pipeline is built calls

    handle = modes.install(pipe, args, session)     # None when no mode is active
    ...
    handle.uninstall()

`layout` describes the rank layout and how to register a mode.
"""

from __future__ import annotations

from typing import Any

from compactfusion_xdit.modes import layout
from compactfusion_xdit.modes.layout import CompositionError, check

__all__ = ["install", "check", "CompositionError", "layout"]


def install(pipe: Any, args: Any, session: Any = None) -> Any:
    """Install the active mode on `pipe` over `layout.mode_group()`; None when no mode is active."""
    mode = layout.active_mode(args)
    if mode is None:
        return None
    return layout.installer(mode)(pipe, args, layout.mode_group(), session)
