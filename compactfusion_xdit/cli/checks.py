"""Usage checks shared by the launchers and the ranks: one error class, one set of rules.

    settings = checks.parallel_settings(ns)
    checks.check_settings(ns, model_path, class_name, world_size)   # UsageError names the fix

The launchers run these before torchrun starts, so a mistake costs one line and exit 2; each rank
runs them again on what it parsed (a rank started by hand, or by another launcher).
"""

from __future__ import annotations

import argparse

from compactfusion_xdit.cli import flags as cli_args
from compactfusion_xdit.models import registry
from compactfusion_xdit.modes import layout as modes_layout


class UsageError(ValueError):
    """A setting the user can fix; the message says what to change."""


def parallel_settings(args: argparse.Namespace) -> dict:
    """Every parallel degree of `args` (xfuser's and the modes'), for checks and stats.json."""
    pipefusion = int(getattr(args, "pipefusion_parallel_degree", 1) or 1)
    patches = getattr(args, "num_pipeline_patch", None)
    return {
        "data_parallel": int(getattr(args, "data_parallel_degree", 1) or 1),
        "ulysses": int(getattr(args, "ulysses_degree", 1) or 1),
        "ring": int(getattr(args, "ring_degree", 1) or 1),
        "pipefusion": pipefusion,
        "cfg": 2 if getattr(args, "use_cfg_parallel", False) else 1,
        "tensor_parallel": int(getattr(args, "tensor_parallel_degree", 1) or 1),
        # xfuser's config: no --num_pipeline_patch means one patch per PipeFusion stage
        "num_pipeline_patch": int(patches) if patches else pipefusion,
        "warmup_steps": int(getattr(args, "warmup_steps", 1)),
        **modes_settings(args),
    }


def modes_settings(args: argparse.Namespace) -> dict:
    """The parallel modes' degrees (see `compactfusion_xdit.modes`)."""
    return {"patch": modes_layout.degree(args, "patch"), "patch_mode": getattr(args, "patch_parallel_mode", "displaced"),
            "step": modes_layout.degree(args, "step"), "step_warmup": int(getattr(args, "step_parallel_warmup", 2) or 0)}


def compression_config(args: argparse.Namespace):
    """The `CompressionConfig` of the ``--compression*`` flags; a bad value, or a flag that cannot
    go with compression (``--use_fp8_comms``, ``--use_torch_compile``), is a UsageError."""
    try:
        config = cli_args.compression_config(args)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if getattr(args, "use_fp8_comms", False) and config.enabled:
        raise UsageError(f"--use_fp8_comms and --compression {config.name} both change the Ulysses exchange; "
                         "drop one of them")
    problem = cli_args.compile_conflict(args)
    if problem:
        raise UsageError(problem)
    return config


def check_heads(backbone: dict, ulysses: int) -> None:
    """Ulysses splits attention heads: their count (from the backbone's config) must divide."""
    heads = backbone.get("num_attention_heads")
    if isinstance(heads, int) and heads % ulysses:  # a UNet lists heads per block (and runs no Ulysses)
        raise UsageError(f"the model has {heads} attention heads, not divisible by --ulysses_degree {ulysses}; "
                         f"use a Ulysses degree that divides {heads} (move the rest to --ring_degree)")


def check_unet_pipeline(par: dict, class_name: str | None) -> None:
    """xfuser 0.7.0 splits no UNet pipeline (SVD, AudioLDM2): only step parallelism and data parallel run them."""
    if class_name not in registry.UNET_PIPELINES:
        return
    names = {"ulysses": "--ulysses_degree", "ring": "--ring_degree", "pipefusion": "--pipefusion_parallel_degree",
             "tensor_parallel": "--tensor_parallel_degree", "patch": "--patch_parallel_degree"}
    for key, flag in names.items():
        if par[key] > 1:
            raise UsageError(f"{class_name} is a UNet pipeline that xfuser cannot split; drop {flag} {par[key]} "
                             "(run it with --step_parallel_degree)")
    if par["cfg"] > 1:
        raise UsageError(f"{class_name} is a UNet pipeline that xfuser cannot split; drop --use_cfg_parallel "
                         "(run it with --step_parallel_degree)")


def check_bands(model_path: str, patch: int, height: int | None) -> None:
    """UNet patch parallelism: the bands of latent rows must stay aligned through every down-sampling."""
    multiple = registry.unet_height_multiple(model_path) if patch > 1 and height else None
    if multiple and height % (patch * multiple):
        step = patch * multiple
        raise UsageError(f"--patch_parallel_degree {patch} on this UNet needs --height to be a multiple of {step} "
                         f"({patch} bands x {multiple} image rows per down-sampled latent row), got {height}; "
                         f"use --height {', '.join(str(step * k) for k in range(1, 4))}, ...")


def check_settings(args: argparse.Namespace, model_path: str | None, class_name: str | None,
                   world_size: int) -> None:
    """Reject combinations xfuser would fail on later (or silently mis-handle), one line each.
    `model_path`/`class_name` None: the model's own checks are skipped."""
    par = parallel_settings(args)
    product = par["data_parallel"] * par["ulysses"] * par["ring"] * par["pipefusion"] * par["cfg"] * par["tensor_parallel"]
    product *= par["patch"] * par["step"]
    if product != world_size:
        raise UsageError(
            f"the parallel degrees multiply to {product} (data {par['data_parallel']} x ulysses {par['ulysses']} x ring "
            f"{par['ring']} x pipefusion {par['pipefusion']} x cfg {par['cfg']} x patch {par['patch']} x step "
            f"{par['step']}) but {world_size} ranks were launched; "
            f"launch {product} ranks or change the degrees"
        )
    check_unet_pipeline(par, class_name)
    if model_path:
        check_heads(registry.backbone_config(model_path), par["ulysses"])
        check_bands(model_path, par["patch"], getattr(args, "height", None))
    if par["cfg"] > 1 and class_name == "FluxPipeline":
        raise UsageError("Flux has no classifier-free guidance branch to split; drop --use_cfg_parallel")
    if par["pipefusion"] > 1 and par["num_pipeline_patch"] < par["pipefusion"]:
        raise UsageError(
            f"--num_pipeline_patch {par['num_pipeline_patch']} is smaller than --pipefusion_parallel_degree "
            f"{par['pipefusion']}; use at least one patch per stage"
        )
    try:
        modes_layout.check(args)
    except ValueError as err:
        raise UsageError(str(err)) from None
    output_type = getattr(args, "output_type", "pil")
    if output_type not in ("pil", "latent"):
        raise UsageError(f"--output_type {output_type!r} is not supported; use pil or latent")
    compression_config(args)
