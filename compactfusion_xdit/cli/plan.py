"""The launch plan: what the launchers read of the command line before any rank starts.

    ns = plan.preparse(argv)            # no xfuser import
    launch = plan.plan_launch(ns)       # rank count, placement, port; UsageError names the fix

Used by the ``xfuser`` and ``cfx-xdit`` launchers and the dry run.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys

from compactfusion_xdit.cli import flags as cli_args
from compactfusion_xdit.cli import ports
from compactfusion_xdit.cli import checks
from compactfusion_xdit.cli.checks import UsageError
from compactfusion_xdit.models import registry
from compactfusion_xdit.modes import layout as modes_layout
from compactfusion_xdit.rank import requests as request_list

#: xfuser's degree flags and the ``--use_cfg_parallel`` switch: together they fix the rank count.
DEGREE_FLAGS = ("--data_parallel_degree", "--ulysses_degree", "--ring_degree", "--pipefusion_parallel_degree",
                "--tensor_parallel_degree")
DEFAULT_MULTINODE_PORT = 29500


class _RaisingParser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UsageError(message)


@dataclasses.dataclass(frozen=True)
class LaunchPlan:
    """Where the ranks go: torchrun's placement flags."""

    world_size: int
    nproc_per_node: int
    nnodes: int
    node_rank: int
    master_addr: str
    master_port: int


def normalise_flag_names(argv: list[str]) -> list[str]:
    """Dashes in flag names become underscores, as xfuser's FlexibleArgumentParser does."""
    out = []
    for arg in argv:
        if arg.startswith("--"):
            key, eq, value = arg.partition("=")
            arg = "--" + key[2:].replace("-", "_") + eq + value
        out.append(arg)
    return out


def preparse(argv: list[str]) -> argparse.Namespace:
    """The flags the launcher reads, without importing xfuser; other flags are left to the ranks."""
    parser = _RaisingParser(prog="xfuser", add_help=False, allow_abbrev=False)
    parser.add_argument("--model", default=None)
    for flag in DEGREE_FLAGS:
        parser.add_argument(flag, type=int, default=1)
    parser.add_argument("--use_cfg_parallel", action="store_true")
    parser.add_argument("--use_fp8_comms", action="store_true")
    parser.add_argument("--use_torch_compile", action="store_true")  # refused with --compression (args.compile_conflict)
    parser.add_argument("--use_parallel_vae", action="store_true")  # read by the modes' composition check
    parser.add_argument("--warmup_steps", type=int, default=1)
    parser.add_argument("--prompt", nargs="*", default="")
    cli_args.add_compactfusion_args(parser)
    cli_args.add_launcher_args(parser)
    ns, _ = parser.parse_known_args(normalise_flag_names(argv))
    return ns


def world_size(ns: argparse.Namespace) -> int:
    """The number of ranks the parallel degrees need (as xfuser's ``xdit`` computes it)."""
    for flag in DEGREE_FLAGS:
        value = getattr(ns, flag[2:])
        if value < 1:
            raise UsageError(f"{flag} {value} must be at least 1")
    degrees = [getattr(ns, flag[2:]) for flag in DEGREE_FLAGS]
    return math.prod(degrees) * (2 if ns.use_cfg_parallel else 1) * modes_layout.total_degree(ns)


def describe_degrees(ns: argparse.Namespace) -> str:
    parts = [f"{flag[2:].replace('_parallel_degree', '').replace('_degree', '')} {getattr(ns, flag[2:])}"
             for flag in DEGREE_FLAGS]
    mode = modes_layout.describe(ns)
    return " x ".join(parts + [f"cfg {2 if ns.use_cfg_parallel else 1}"] + ([mode] if mode else []))


def model_path(model: str | None) -> str:
    """The diffusers folder of `model` (a built-in is built once, here); UsageError if neither."""
    try:
        return registry.resolve(model, announce=lambda line: print(f"xfuser: {line}", file=sys.stderr))
    except registry.ModelError as err:
        raise UsageError(str(err)) from None


def model_config(model: str | None) -> tuple[str, dict]:
    """`model`'s pipeline class and backbone config, read without building a built-in or importing
    torch (`registry.model_config`); UsageError if no rank could load it."""
    try:
        return registry.model_config(model)
    except registry.ModelError as err:
        raise UsageError(str(err)) from None


def plan_launch(ns: argparse.Namespace, check_model: bool = True,
                settings: argparse.Namespace | None = None) -> LaunchPlan:
    """Check the launcher-visible settings; return the placement. Raises UsageError.

    Cheap: no torch or xfuser import, and a built-in model is not built (its class and head count
    come from `registry.BUILTIN_CONFIGS`); the launcher builds it (`model_path`) once the launch is
    valid. ``check_model=False`` skips the model (its class and head count): the dry run of a config
    whose model path is a placeholder. `settings` (every flag, parsed as the ranks will) adds the
    ranks' own usage checks (`checks.check_settings`), so they fail here, before torchrun starts."""
    checks.compression_config(ns)
    try:
        modes_layout.check(ns)
        if getattr(ns, "prompt_file", None):
            request_list.load_prompt_file(ns.prompt_file)  # a bad line fails here, not in every rank
    except ValueError as err:
        raise UsageError(str(err)) from None
    world = world_size(ns)
    if ns.nnodes < 1 or not 0 <= ns.node_rank < ns.nnodes:
        raise UsageError(f"--node_rank {ns.node_rank} must lie in [0, --nnodes {ns.nnodes})")
    if ns.nproc_per_node is None:
        if world % ns.nnodes:
            raise UsageError(f"the parallel degrees ({describe_degrees(ns)}) need {world} ranks, "
                              f"which {ns.nnodes} nodes cannot share evenly; change the degrees or --nnodes")
        nproc = world // ns.nnodes
    else:
        nproc = ns.nproc_per_node
        if nproc * ns.nnodes != world:
            raise UsageError(f"the parallel degrees multiply to {world} ({describe_degrees(ns)}) but "
                              f"--nproc_per_node {nproc} x --nnodes {ns.nnodes} gives {nproc * ns.nnodes} ranks; "
                              f"drop --nproc_per_node or change the degrees so they multiply to {nproc * ns.nnodes}")
    class_name, backbone = model_config(ns.model) if check_model else (None, {})
    checks.check_heads(backbone, ns.ulysses_degree)
    if settings is not None:
        # no model path: the head count was checked above from the cheap config
        checks.check_settings(settings, None, class_name, world)
    if ns.nnodes > 1 and ns.master_addr is None:
        raise UsageError(f"--nnodes {ns.nnodes} needs --master_addr (the address of node 0, the same on every node)")
    try:
        ports.check_master_port(ns.master_port, ns.node_rank)
    except ports.PortInUse as err:
        raise UsageError(str(err)) from None
    port = ns.master_port if ns.master_port is not None else (
        DEFAULT_MULTINODE_PORT if ns.nnodes > 1 else ports.free_port())
    return LaunchPlan(world, nproc, ns.nnodes, ns.node_rank, ns.master_addr or "127.0.0.1", port)
