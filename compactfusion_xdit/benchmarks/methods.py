"""The parallel methods the benchmarks compare, as ``xfuser`` flags for a given rank count.

    available_methods()                 # those this checkout supports (patch/step when present)
    method_flags("ring", 4)             # ["--ring_degree", "4"]

Patch and step parallelism are detected from the argument parser (their flags exist or not).
``sdxl-patch`` (displaced patch parallelism over bands of latent rows on a UNet) runs its own model
(`OWN_MODELS`), whatever model the benchmark runs for the other methods.
"""

from __future__ import annotations

import argparse

#: Every method in display order; the last three need the parallel-mode flags.
ALL_METHODS = ("ulysses", "ring", "ulysses-ring", "pipefusion", "patch", "displaced", "step", "sdxl-patch")
#: The communication path each method's exchanges count under in stats.json.
METHOD_PATHS = {"ulysses": "ulysses", "ring": "ring", "ulysses-ring": "ulysses,ring", "pipefusion": "pipefusion",
                "patch": "patch", "displaced": "patch", "step": "step", "sdxl-patch": "patch"}
#: Methods that run their own built-in model: method -> (model, height, width). tiny-sdxl at 64x64:
#: 32 latent rows, bands of 2 or 4 that stay aligned through its one down-sampling.
OWN_MODELS = {"sdxl-patch": ("tiny-sdxl", 64, 64)}


def _parser_flags() -> set[str]:
    from compactfusion_xdit.cli import flags as cli_args

    parser = argparse.ArgumentParser(add_help=False)
    cli_args.add_compactfusion_args(parser)
    return {s for action in parser._actions for s in action.option_strings}


def available_methods() -> list[str]:
    """`ALL_METHODS` minus the modes whose flags this checkout lacks."""
    flags = _parser_flags()
    out = []
    for method in ALL_METHODS:
        if method in ("patch", "displaced", "sdxl-patch") and "--patch_parallel_degree" not in flags:
            continue
        if method == "step" and "--step_parallel_degree" not in flags:
            continue
        out.append(method)
    return out


def method_flags(method: str, ranks: int) -> list[str]:
    """The degree flags that run `method` on `ranks` ranks; ValueError when it cannot."""
    n = str(ranks)
    if method == "ulysses":
        return ["--ulysses_degree", n]
    if method == "ring":
        return ["--ring_degree", n]
    if method == "ulysses-ring":
        if ranks < 4 or ranks % 2:
            raise ValueError(f"ulysses-ring needs an even rank count >= 4, got {ranks}")
        return ["--ulysses_degree", "2", "--ring_degree", str(ranks // 2)]
    if method == "pipefusion":
        return ["--pipefusion_parallel_degree", n, "--num_pipeline_patch", n, "--warmup_steps", "1"]
    if method == "patch":
        return ["--patch_parallel_degree", n, "--patch_parallel_mode", "sync"]
    if method in ("displaced", "sdxl-patch"):
        return ["--patch_parallel_degree", n, "--patch_parallel_mode", "displaced", "--warmup_steps", "1"]
    if method == "step":
        return ["--step_parallel_degree", n]
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(ALL_METHODS)}")


def parse_methods(text: str, ranks: int, own_models: bool = False) -> list[str]:
    """A comma list (or 'all') -> the methods to run; unknown or unavailable names are a ValueError.
    'all' includes the methods with their own model (`OWN_MODELS`) only when `own_models`."""
    available = available_methods()
    if text == "all":
        return [m for m in available if (m != "ulysses-ring" or (ranks >= 4 and ranks % 2 == 0))
                and (own_models or m not in OWN_MODELS)]
    chosen = [m.strip() for m in text.split(",") if m.strip()]
    for m in chosen:
        if m not in ALL_METHODS:
            raise ValueError(f"unknown method {m!r}; choose from {', '.join(ALL_METHODS)} or 'all'")
        if m not in available:
            raise ValueError(f"method {m!r} needs the parallel-mode flags, which this checkout lacks")
        method_flags(m, ranks)
    return chosen


def default_model() -> str:
    """The trained built-in ``digits-flux`` when this checkout has its weights, else ``tiny-flux``."""
    try:
        from compactfusion_xdit.models import digits
    except ImportError:
        return "tiny-flux"
    return "digits-flux" if digits.is_available() else "tiny-flux"
