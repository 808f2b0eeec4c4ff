"""The ``--patch_parallel_degree`` entry point of `compactfusion_xdit.modes`: the patch-parallel
mode that fits the pipeline (image tokens of a DiT, `modes.patch_parallel`; latent rows of a UNet,
`modes.unet_patch_parallel`), hooked in."""

from __future__ import annotations

from typing import Any

from compactfusion_xdit.modes.patch_parallel import PatchParallel, install_on
from compactfusion_xdit.modes.unet_patch_parallel import UNetPatchParallel


def install(pipe: Any, args: Any, group: Any, session: Any = None):
    """Patch parallelism from the parsed flags over `group`; returns the handle to uninstall."""
    from compactfusion_xdit.patches.unet_patch_hooks import unet_of

    cls = UNetPatchParallel if unet_of(pipe) is not None else PatchParallel
    mode = cls(int(args.patch_parallel_degree), getattr(args, "patch_parallel_mode", "displaced"),
               int(getattr(args, "warmup_steps", 1)), group, session)
    return install_on(pipe, mode, cfg_parallel=bool(getattr(args, "use_cfg_parallel", False)))
