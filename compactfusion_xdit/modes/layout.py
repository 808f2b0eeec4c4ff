"""Where the extra parallel modes sit in xfuser's rank layout, and which combinations are allowed.

The modes (patch parallelism, step parallelism) add one factor to the world size. xfuser never
sees them as such: the factor is presented to xfuser as its *data-parallel* degree. With a
single prompt, xfuser's pipelines run a full replica per data-parallel rank (the batch is split
across data-parallel ranks only when several prompts are given, which the modes refuse), and
xfuser's data-parallel group joins exactly the ranks that hold the same position in every other
dimension (same CFG branch, same Ulysses/ring/PipeFusion rank): that group is the group a mode
runs over (`mode_group`). xfuser orders ranks ``tp-sp-pp-cfg-dp``, so the mode index is the
slowest-varying one: global rank = mode_rank * (cfg * sp * pp * tp) + inner rank.

    world size = data_parallel * ulysses * ring * pipefusion * tensor * cfg * patch * step

Registering a mode: add a `ModeSpec` to `MODES`. Its ``installer`` names a function
``install(pipe, args, group, session) -> handle``: `pipe` is the built xfuser pipeline wrapper,
`args` the parsed flags, `group` the process group of the mode (`mode_group`), `session` the
`CompressionSession` or None (compression off); the handle has ``uninstall()``. The worker calls
`compactfusion_xdit.modes.install` once after the pipeline is built; it runs the installer of the
one mode whose degree is > 1. ``compatible`` lists the xfuser dimensions the mode may be combined
with (``cfg``, ``ulysses``, ``ring``, ``pipefusion``, ``tensor``, ``data``); `check` refuses the
others, and refuses two modes at once.

Nothing here imports xfuser except `mode_group`, so the launcher can call `check` before it.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
from typing import Any

#: xfuser's degree flags (namespace attribute, short name used in messages and `compatible`).
XFUSER_DEGREES = (("data_parallel_degree", "data"), ("ulysses_degree", "ulysses"), ("ring_degree", "ring"),
                  ("pipefusion_parallel_degree", "pipefusion"), ("tensor_parallel_degree", "tensor"))
PATCH_MODES = ("sync", "displaced")


@dataclasses.dataclass(frozen=True)
class ModeSpec:
    """One parallel mode: its degree flag (namespace attribute), what it combines with, its installer."""

    name: str
    degree_attr: str
    compatible: frozenset[str]
    installer: str  # "package.module:function", imported only when the mode is used

    @property
    def flag(self) -> str:
        return "--" + self.degree_attr


MODES: dict[str, ModeSpec] = {
    "patch": ModeSpec("patch", "patch_parallel_degree", frozenset({"cfg"}),
                      "compactfusion_xdit.modes.patch_install:install"),
    # step x Ulysses/ring: each step group's model runs sequence-parallel inside it (tests/modes/test_step_parallel.py)
    "step": ModeSpec("step", "step_parallel_degree", frozenset({"cfg", "ulysses", "ring"}),
                     "compactfusion_xdit.modes.step_parallel:install"),
}


class CompositionError(ValueError):
    """Settings the modes cannot run with; the message names the flags and the fix."""


def _int(ns: Any, attr: str, default: int = 1) -> int:
    value = getattr(ns, attr, default)
    return default if value is None else int(value)


def degree(ns: Any, mode: str) -> int:
    """The degree of `mode` in the namespace `ns` (1 when the flag is absent)."""
    return _int(ns, MODES[mode].degree_attr)


def total_degree(ns: Any) -> int:
    """The product of every mode's degree: the factor the modes add to the world size."""
    product = 1
    for mode in MODES:
        product *= degree(ns, mode)
    return product


def active_mode(ns: Any) -> str | None:
    """The mode whose degree is > 1 (None when none is); `check` guarantees at most one."""
    active = [m for m in MODES if degree(ns, m) > 1]
    return active[0] if active else None


def xfuser_data_parallel_degree(ns: Any) -> int:
    """The data-parallel degree to give xfuser: the user's times the modes' factor."""
    return _int(ns, "data_parallel_degree") * total_degree(ns)


def _xfuser_dimensions(ns: Any) -> dict[str, int]:
    dims = {short: _int(ns, attr) for attr, short in XFUSER_DEGREES}
    dims["cfg"] = 2 if getattr(ns, "use_cfg_parallel", False) else 1
    return dims


def check(ns: Any) -> None:
    """Raise `CompositionError` (one line naming the fix) for mode settings that cannot run.

    Reads only plain namespace attributes; works on the launcher's partial namespace and on the
    worker's full one (attributes a namespace lacks take their defaults)."""
    for spec in MODES.values():
        value = _int(ns, spec.degree_attr)
        if value < 1:
            raise CompositionError(f"{spec.flag} {value} must be at least 1")
    active = [m for m in MODES if degree(ns, m) > 1]
    if len(active) > 1:
        flags = " and ".join(f"{MODES[m].flag} {degree(ns, m)}" for m in active)
        raise CompositionError(f"{flags} cannot be combined; use one of them")
    mode = getattr(ns, "patch_parallel_mode", "displaced")
    if mode not in PATCH_MODES:
        raise CompositionError(f"--patch_parallel_mode {mode!r} is unknown; use {' or '.join(PATCH_MODES)}")
    if not active:
        return
    spec = MODES[active[0]]
    for name, value in _xfuser_dimensions(ns).items():
        if value > 1 and name not in spec.compatible:
            flag = "--use_cfg_parallel" if name == "cfg" else f"--{dict((s, a) for a, s in XFUSER_DEGREES)[name]} {value}"
            allowed = ", ".join(sorted(spec.compatible)) or "nothing else"
            raise CompositionError(f"{spec.flag} {degree(ns, spec.name)} cannot be combined with {flag} "
                                   f"({spec.name} parallelism combines with: {allowed}); drop one of them")
    if getattr(ns, "use_parallel_vae", False):
        raise CompositionError(f"{spec.flag} {degree(ns, spec.name)} cannot be combined with --use_parallel_vae; "
                               "drop --use_parallel_vae")
    prompt = getattr(ns, "prompt", None)
    if isinstance(prompt, (list, tuple)) and len(prompt) > 1:
        raise CompositionError(f"{spec.flag} {degree(ns, spec.name)} runs one prompt per request, got {len(prompt)} "
                               "prompts; pass one --prompt")
    if spec.name == "patch" and mode == "displaced" and _int(ns, "warmup_steps", 1) < 1:
        raise CompositionError("--patch_parallel_mode displaced needs --warmup_steps >= 1 (the first step has no "
                               "earlier K/V to reuse); raise --warmup_steps or use --patch_parallel_mode sync")
    if spec.name == "step":
        warmup = _int(ns, "step_parallel_warmup", 1)
        if warmup < 1:
            raise CompositionError("--step_parallel_warmup must be at least 1 with --step_parallel_degree > 1 "
                                   "(the first window reuses the last warm-up step's noise prediction)")


def mode_group():
    """The process group a mode runs over: xfuser's data-parallel group (see the module docstring).

    Call after xfuser has initialised its groups. Group rank r of it is mode rank r."""
    from xfuser.core.distributed import get_dp_group

    return get_dp_group().device_group


def installer(mode: str):
    """The install function of `mode` (imported on first use)."""
    module, _, name = MODES[mode].installer.partition(":")
    return getattr(importlib.import_module(module), name)


def describe(ns: argparse.Namespace) -> str:
    """``patch 2`` / ``step 2`` for messages; empty when no mode is active."""
    mode = active_mode(ns)
    return "" if mode is None else f"{mode} {degree(ns, mode)}"
