"""``cfx-xdit``: xfuser's ``xdit`` command with the drop-in runner (`compactfusion_xdit.rank.runner`).

    xdit     --model FLUX.1-dev --ulysses_degree 2 --prompt "a cat"                            # before
    cfx-xdit --model FLUX.1-dev --ulysses_degree 2 --prompt "a cat" --compression residual-int4  # after

Same flags and rank count as ``xdit`` (the product of the data, Ulysses, ring, PipeFusion and tensor
degrees, x2 with ``--use_cfg_parallel``, unless ``--nproc_per_node`` is given); torchrun then runs
``-m compactfusion_xdit.rank.runner`` in every rank. Differences: the compression flags are checked here
before any rank starts (one line, exit 2); a ``--master_port`` that is taken is refused with a free
one suggested, and without ``--master_port`` a single node picks a free port (``xdit`` uses 29500).
"""

from __future__ import annotations

import sys

from compactfusion_xdit.cli import flags as cli_args
from compactfusion_xdit.cli import plan, ports, torchrun
from compactfusion_xdit.rank import requests as request_list

RUNNER_MODULE = "compactfusion_xdit.rank.runner"


def plan_launch(argv: list[str]) -> plan.LaunchPlan:
    """Check the launcher-visible flags; return the placement. Raises plan.UsageError."""
    ns = plan.preparse(argv)
    try:
        config = cli_args.compression_config(ns)
        conflict = cli_args.compile_conflict(ns)
        if conflict:
            raise ValueError(conflict)
        if ns.use_fp8_comms and config.enabled:
            raise ValueError(f"--use_fp8_comms and --compression {config.name} both change the Ulysses exchange; "
                             "drop one of them")
        ports.check_master_port(ns.master_port, ns.node_rank)
        if ns.prompt_file:
            request_list.load_prompt_file(ns.prompt_file)  # a bad line fails here, not in every rank
    except ValueError as err:
        raise plan.UsageError(str(err)) from None
    if ns.model is None:
        raise plan.UsageError("no --model given; pass a registered name (e.g. FLUX.1-dev) or a local diffusers folder")
    world = plan.world_size(ns)
    nproc = ns.nproc_per_node if ns.nproc_per_node is not None else max(world // max(ns.nnodes, 1), 1)
    port = ns.master_port if ns.master_port is not None else (
        plan.DEFAULT_MULTINODE_PORT if ns.nnodes > 1 else ports.free_port())
    return plan.LaunchPlan(world, nproc, ns.nnodes, ns.node_rank, ns.master_addr or "127.0.0.1", port)


def _runner_argv(argv: list[str]) -> list[str]:
    """`argv` without torchrun's placement flags (the ranks' parser does not know them)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        key = "--" + arg[2:].replace("-", "_").partition("=")[0] if arg.startswith("--") else None
        if key in cli_args.LAUNCHER_FLAGS:
            skip = "=" not in arg
            continue
        out.append(arg)
    return out


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``cfx-xdit`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        from compactfusion_xdit.rank import runner

        runner.build_parser().print_help()
        return 0
    try:
        launch = plan_launch(argv)
    except plan.UsageError as err:
        print(f"cfx-xdit: error: {err}", file=sys.stderr)
        return 2
    import torch

    command = torchrun.torchrun_command(launch, _runner_argv(argv), target=("-m", RUNNER_MODULE))
    return torchrun.run_to_completion(command, torchrun.launch_env(torch.cuda.is_available()))


if __name__ == "__main__":
    sys.exit(main())
