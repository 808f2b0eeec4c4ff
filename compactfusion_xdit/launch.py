"""Run an existing xfuser script with the plugin installed first: one changed command.

    torchrun --nproc_per_node 2 examples/flux_example.py --model ... --ulysses_degree 2          # before
    torchrun --nproc_per_node 2 -m compactfusion_xdit.launch --compression residual-int4 \\
        examples/flux_example.py --model ... --ulysses_degree 2                                   # after

Our ``--compression*`` flags come before the script path; everything after it is the script's own
command line, unchanged. Each rank installs the patches (`compactfusion_xdit.install`), then runs
the script as ``__main__``. ``$CFX_COMPRESSION`` is the default compression (for launchers that
cannot add flags).
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys

from compactfusion_xdit import api, envs
from compactfusion_xdit.reliability import orphans
from compactfusion_xdit.cli import flags as cli_args


def split_argv(argv: list[str]) -> tuple[list[str], str, list[str]]:
    """(our flags, script path, the script's arguments): the script is the first ``*.py`` argument."""
    for i, arg in enumerate(argv):
        if arg.endswith(".py") and not arg.startswith("-"):
            return argv[:i], arg, argv[i + 1:]
    raise ValueError("no script given; usage: python -m compactfusion_xdit.launch [--compression NAME] script.py [args]")


def main(argv: list[str] | None = None) -> int:
    orphans.exit_with_parent()  # this rank ends when torchrun (or the launcher) dies
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        ours, script, script_argv = split_argv(argv)
        if not os.path.isfile(script):
            raise ValueError(f"script {script!r} does not exist")
        parser = argparse.ArgumentParser(prog="python -m compactfusion_xdit.launch")
        cli_args.add_compression_args(parser)
        parser.set_defaults(compression=envs.get(envs.COMPRESSION) or "none")
        ns = parser.parse_args(ours)
        config = cli_args.compression_config(ns)
    except ValueError as err:
        print(f"compactfusion_xdit.launch: error: {err}", file=sys.stderr)
        return 2
    api.install(config)
    sys.argv = [script, *script_argv]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
