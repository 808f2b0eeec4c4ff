"""The ``xfuser`` command: check the flags, then launch one rank per device with torchrun.

    xfuser --model tiny-flux --ulysses_degree 2 --height 64 --width 64 \\
        --num_inference_steps 8 --prompt "a cat" --compression residual-int4 --output_dir out

Like xfuser's own ``xdit`` command, the number of ranks is the product of the parallel degrees
(data, Ulysses, ring, PipeFusion, tensor; ``--use_cfg_parallel`` counts 2), and the ranks run
``python -m torch.distributed.run ... -m compactfusion_xdit.rank.worker <the same flags>``. Mistakes
that would otherwise surface in every rank after the xfuser import (an unknown model, degrees
that do not match the rank count, ``--use_fp8_comms`` with compression, an unknown compression
name, Flux with ``--use_cfg_parallel``) are reported here, as one line with exit status 2, before
torch, diffusers or xfuser is imported and before a built-in model is built (its pipeline class and
head count come from `compactfusion_xdit.models.registry.BUILTIN_CONFIGS`); ``--help`` prints xfuser's
flags from the snapshot (`compactfusion_xdit.cli.flag_table`) without importing xfuser either. Without
CUDA the ranks use gloo with one thread each (unless ``OMP_NUM_THREADS`` is set) and a free port.
The exit status is torchrun's: non-zero when any rank fails, 2 when the first rank to fail refused
its settings (a usage error); a failure shows the ranks' one-line errors, not torchrun's report
(`compactfusion_xdit.cli.torchrun`; ``CFX_DEBUG=1`` shows it).

``--config FILE.yaml`` reads the settings from a file (`compactfusion_xdit.cli.yaml_config`; flags on the
command line override it) and ``--dry-run`` runs the checks and prints the plan without launching
(`compactfusion_xdit.cli.dry_run`; exit status 3 when the model folder does not exist).
"""

from __future__ import annotations

import sys

from compactfusion_xdit.cli import dry_run, flag_table, plan, torchrun, yaml_config


def version_line() -> str:
    """``xfuser --version``: this plugin's version and the xfuser it drives (no xfuser import)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        xfuser_version = version("xfuser")
    except PackageNotFoundError:
        xfuser_version = "not installed"
    return f"xfuser (compactfusion-xdit {version('compactfusion-xdit')}) on xfuser {xfuser_version}"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``xfuser`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--version" in argv:
        print(version_line())
        return 0
    if "-h" in argv or "--help" in argv:
        flag_table.fast_parser(for_help=True).print_help()  # xfuser's flags from the snapshot: no xfuser import
        return 0
    try:
        argv = yaml_config.expand_argv(argv)  # --config FILE: the file's flags, then the command line's
        argv, dry = dry_run.split(argv)
        if dry:
            return dry_run.run(argv)
        # every flag's value and the ranks' usage checks, before anything heavy (no torch, no model
        # build): refused here in well under a second, not in each rank after torchrun started
        full = dry_run.settings(argv)
        ns = plan.preparse(argv)
        launch = plan.plan_launch(ns, settings=full)
        plan.model_path(ns.model)  # a valid launch: build a built-in model once, before the ranks
    except (plan.UsageError, yaml_config.ConfigError) as err:
        print(f"xfuser: error: {err}", file=sys.stderr)
        return 2
    import torch

    return torchrun.run_to_completion(torchrun.torchrun_command(launch, argv), torchrun.launch_env(torch.cuda.is_available()))


if __name__ == "__main__":
    sys.exit(main())
