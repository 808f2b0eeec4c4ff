"""``xfuser ... --dry-run``: check the settings and print the launch plan; no rank is started.

    xfuser --config configs/flux-4gpu-ulysses.yaml --dry-run

Runs every check of a real launch (flags, compression, degrees against the rank count, the ranks'
usage checks of `cli.checks`) and prints the world size, xfuser's process groups, the input, the compression
settings and the torchrun command. A model folder that does not exist does not stop the dry run
(configs ship with placeholder paths): the plan is printed with a warning line, and the exit status is
`MODEL_MISSING` (3) instead of 0, so a script can tell "ready to launch" from "set the model first".
Refused settings are one ``xfuser: error:`` line and status 2, as in a launch.
"""

from __future__ import annotations

import argparse
import difflib
import math
import shlex

from compactfusion_xdit.cli import flags as cli_args
from compactfusion_xdit.cli import flag_table, plan, torchrun
from compactfusion_xdit.models import registry

DRY_RUN_FLAGS = ("--dry-run", "--dry_run")
#: The dry run's exit status when every check passed but ``--model`` names no existing folder.
MODEL_MISSING = 3


def split(argv: list[str]) -> tuple[list[str], bool]:
    """argv without the dry-run flag, and whether it was there."""
    rest = [arg for arg in argv if arg not in DRY_RUN_FLAGS]
    return rest, len(rest) != len(argv)


def settings(argv: list[str]) -> argparse.Namespace:
    """Every setting of the command line (defaults filled in), parsed like the ranks will; an
    unknown flag is a UsageError naming the closest valid one."""
    parser = flag_table.fast_parser()
    try:
        ns, unknown = parser.parse_known_args(plan.normalise_flag_names(argv))
    except ValueError as err:
        raise plan.UsageError(str(err)) from None
    flags = [arg.partition("=")[0] for arg in unknown if arg.startswith("-")]
    if flags:
        known = [option for action in parser._actions for option in action.option_strings]
        close = difflib.get_close_matches(flags[0], known, n=1)
        hint = f"; did you mean {close[0]}?" if close else "; xfuser --help lists every flag"
        raise plan.UsageError(f"unrecognized flag {flags[0]}{hint}")
    cli_args.apply_native_settings(ns, argv)  # a built-in's own size and steps, as the ranks will
    return ns


#: The dry run lists xfuser's groups up to this many ranks.
MAX_LISTED_RANKS = 512


def _groups(ns: argparse.Namespace, nproc_per_node: int = 0) -> list[str]:
    """xfuser's groups; on several nodes (torchrun places ranks node by node, `nproc_per_node`
    each) whether each kind stays inside nodes or crosses them (what ``--compression-scope
    inter-node`` codes)."""
    from compactfusion_xdit.modes import layout
    from compactfusion_xdit.patches import rank_groups

    degrees = (ns.tensor_parallel_degree, ns.ulysses_degree, ns.ring_degree, ns.pipefusion_parallel_degree,
               2 if ns.use_cfg_parallel else 1, layout.xfuser_data_parallel_degree(ns))
    if math.prod(degrees) > MAX_LISTED_RANKS:  # listing every group of a huge world costs minutes and GBs
        return [f"  groups       (not listed above {MAX_LISTED_RANKS} ranks)"]
    try:
        groups = rank_groups.rank_groups(*degrees)
    except Exception as err:  # the layout is informative; the launch checks above already passed
        return [f"  groups       (not computed: {err})"]
    lines = []
    for name, members in groups.items():
        if members and len(members[0]) > 1:
            where = ""
            if nproc_per_node and ns.nnodes > 1:
                crosses = any(len({r // nproc_per_node for r in g}) > 1 for g in members)
                where = "  (across nodes)" if crosses else "  (inside nodes)"
            lines.append(f"  {name:<13}{' '.join('[' + ','.join(map(str, g)) + ']' for g in members)}{where}")
    return lines or ["  groups       none (one rank)"]


def _pipelined(ns: argparse.Namespace) -> bool:
    """Whether the layout's ranks are not in lock-step within a request (PipeFusion, step parallelism)."""
    from compactfusion_xdit.modes import layout

    return int(getattr(ns, "pipefusion_parallel_degree", 1) or 1) > 1 or layout.degree(ns, "step") > 1


def _compression(ns: argparse.Namespace) -> list[str]:
    config = cli_args.compression_config(ns)
    if not config.enabled:
        return ["  compression  none"]
    lines = [f"  compression  {config.name} (warm-up {config.warmup} step(s), paths {','.join(config.paths)}, "
             f"error feedback {'on' if config.error_feedback else 'off'}{', cache check' if config.check else ''}"
             f"{', scope inter-node: groups inside one node stay raw' if config.scope == 'inter-node' else ''})"]
    lines += [f"  schedule     {rule}" for rule in config.schedule]
    if "auto" in (config.mode, *(str(rule.codec) for rule in config.schedule)):
        every = f"every {config.auto_every} requests" if config.auto_every else "once per launch and request shape"
        if _pipelined(ns):  # ranks not in lock-step: measured in a raw request, agreed when the next starts
            when = "measured in the first request (sent raw), agreed at the start of the next"
        else:
            when = "measured in the warm-up, agreed at the first coded step"
        lines.append(f"  auto         decides at run time: per path, the link and codec costs {when}, "
                     f"candidates none .. {config.auto_floor}, same on all ranks ({every})")
    return lines


def run(argv: list[str]) -> int:
    """Print the plan of a launch with these flags; return the dry run's exit status: 0, or
    `MODEL_MISSING` when the model folder does not exist (UsageError for refused settings)."""
    text, model_missing = _plan(argv)
    print(text)
    return MODEL_MISSING if model_missing else 0


def report(argv: list[str]) -> str:
    """The plan of a launch with these flags (UsageError for settings a launch would refuse)."""
    return _plan(argv)[0]


def _plan(argv: list[str]) -> tuple[str, bool]:
    full = settings(argv)  # a mistyped flag first
    ns = plan.preparse(argv)
    missing = None
    if ns.model is not None and ns.model not in registry.BUILTIN_MODELS:
        try:
            registry.resolve(ns.model)  # a local folder: checked, nothing built
        except registry.ModelError as err:
            missing = str(err)
    launch = plan.plan_launch(ns, check_model=missing is None, settings=full)
    if missing is not None:
        model = f"{ns.model} (not found)"
    else:  # the checks above passed, so this is cheap and cannot fail
        class_name = plan.model_config(ns.model)[0]
        model = f"{ns.model} (built-in, {class_name})" if ns.model in registry.BUILTIN_MODELS else f"{ns.model} ({class_name})"
    prompt = full.prompt if isinstance(full.prompt, str) else " ".join(full.prompt)
    lines = [
        "xfuser: dry run, nothing launched",
        f"  model        {model}",
        f"  ranks        {launch.world_size} ({plan.describe_degrees(ns)}); {launch.nnodes} node(s) x "
        f"{launch.nproc_per_node}, rendezvous {launch.master_addr}",
        *_groups(full, launch.nproc_per_node),
        f"  input        {full.height}x{full.width}, {full.num_inference_steps} steps, seed {full.seed}, "
        f"prompt {prompt!r}",
        *_compression(ns),
        f"  output       {full.output_dir} ({full.output_type}), dtype {full.dtype or 'default'}",
        "  command      " + shlex.join(torchrun.torchrun_command(launch, argv)),
    ]
    if missing is not None:
        lines.append(f"warning: {missing} (a real launch stops here; edit model: / --model; "
                     f"dry run exit status {MODEL_MISSING})")
    return "\n".join(lines), missing is not None
