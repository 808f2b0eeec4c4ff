"""Run an existing xfuser script with the plugin installed first: one changed command.

    torchrun --nproc_per_node 2 examples/pixartalpha_example.py --model ... --ulysses_degree 2    # before
    torchrun --nproc_per_node 2 -m compactfusion_xdit.launch --compression residual-int4 \\
        examples/pixartalpha_example.py --model ... --ulysses_degree 2                             # after

Our ``--compression*`` flags come before the script path; everything after it is the script's own
command line, unchanged but for one thing: ``--model NAME`` naming a built-in model (``tiny-pixart``,
``tiny-flux``, ... see `compactfusion_xdit.models.registry`) becomes that model's diffusers folder,
built once into the cache. A local path or hub name (or a folder in the working directory that
happens to carry a built-in's name) is passed on untouched. Each rank installs the patches
(`compactfusion_xdit.install`), then runs the script as ``__main__``. ``$CFX_COMPRESSION`` is the
default compression (for launchers that cannot add flags).

``--compression-stats`` / ``--compression-check``: once the script's work is done, rank 0 prints the
per-path byte table summed over every rank (every pipeline call of the script, xfuser's
``prepare_run`` warm-up included) and, when checking, whether the sender and receiver caches
agreed. Summing is a collective over the default process group, and xfuser's scripts end with
``get_runtime_state().destroy_distributed_env()``, which destroys it. So the launcher collects the
traffic at the moment the script destroys the default group (``torch.distributed.destroy_process_group``
is wrapped while the script runs; every rank of an xfuser script calls it at the same point), and
prints it then. A script that keeps the group gets its report after it returns. If the group is gone
by other means, no collective is attempted (it could hang): each rank prints its own counters,
labelled as such. A script that raises gets no report. With ``--compression-check`` a run whose
caches diverged exits with status 1.
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys
from typing import Any

from compactfusion_xdit import api, envs
from compactfusion_xdit.reliability import orphans
from compactfusion_xdit.cli import flags as cli_args


def _script_index(argv: list[str]) -> int | None:
    """Where the script is: the first ``*.py`` argument."""
    return next((i for i, arg in enumerate(argv) if arg.endswith(".py") and not arg.startswith("-")), None)


def split_argv(argv: list[str]) -> tuple[list[str], str, list[str]]:
    """(our flags, script path, the script's arguments)."""
    i = _script_index(argv)
    if i is not None:
        return argv[:i], argv[i], argv[i + 1:]
    raise ValueError("no script given; usage: python -m compactfusion_xdit.launch [--compression NAME] script.py [args]")


def resolve_model_arg(script_argv: list[str], announce=None) -> list[str]:
    """`script_argv` with ``--model NAME`` / ``--model=NAME`` of a built-in model replaced by its
    folder (`registry.resolve`); anything else, a local path included, is returned unchanged."""
    from compactfusion_xdit.models import registry

    def resolved(value: str) -> str:
        if value in registry.BUILTIN_MODELS and not os.path.exists(value):
            return registry.resolve(value, announce=announce)
        return value

    out = list(script_argv)
    for i, arg in enumerate(out):
        if arg == "--":
            break
        if arg == "--model" and i + 1 < len(out):
            out[i + 1] = resolved(out[i + 1])
        elif arg.startswith("--model="):
            out[i] = "--model=" + resolved(arg[len("--model="):])
    return out


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m compactfusion_xdit.launch", usage="%(prog)s [--compression NAME ...] script.py [script args]",
        description="Run an xfuser script unmodified with compressed communication: each rank installs the plugin, "
        "then runs the script (launch it with torchrun as you would the script).")
    cli_args.add_compression_args(parser)
    parser.set_defaults(compression=envs.get(envs.COMPRESSION) or "none")
    return parser


def _rank() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


class ExitReport:
    """``--compression-stats`` / ``--compression-check`` for a script run by the launcher (see the
    module docstring): collected once, collectively, while the default process group still exists."""

    def __init__(self, session: Any, stats: bool, check: bool) -> None:
        self.session = session
        self.stats = stats
        self.check = check
        self.done = False
        self.cache_consistent: bool | None = None
        self._original_destroy = None

    @property
    def wanted(self) -> bool:
        return self.stats or self.check

    def __enter__(self) -> "ExitReport":
        import torch.distributed as dist

        if self.wanted and dist.is_available():
            original = self._original_destroy = dist.destroy_process_group

            def destroy_process_group(group=None):
                if group is None or group is getattr(dist.GroupMember, "WORLD", None):
                    self.report()  # the last moment the default group can carry the collective
                return original(group)

            destroy_process_group.__wrapped__ = original
            dist.destroy_process_group = destroy_process_group
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        import torch.distributed as dist

        if self._original_destroy is not None:
            dist.destroy_process_group = self._original_destroy
            self._original_destroy = None
        if exc_type is None:
            self.report()  # a script that kept the group (or never had one)

    def report(self) -> None:
        """Print the report once: summed over ranks while the default group exists, else per rank."""
        if self.done or not self.wanted:
            return
        self.done = True
        import torch.distributed as dist

        from compactfusion_xdit.rank import traffic as rank_traffic

        if self.session is None:
            if self.stats and _rank() == 0:
                print("compactfusion: --compression none, nothing compressed\n"
                      + rank_traffic.format_traffic(rank_traffic.NO_TRAFFIC), flush=True)
            return
        if dist.is_available() and dist.is_initialized():
            traffic = rank_traffic.compression_traffic(self.session)  # collective (and the final cache check)
            self.cache_consistent = traffic["cache_consistent"]
            if dist.get_rank() != 0:
                return
            lines = []
            if self.stats:
                lines += [f"compactfusion: {self.session.config.name}, bytes summed over {dist.get_world_size()} "
                          f"ranks, {self.session.requests} pipeline call(s) of the script (warm-up included)",
                          rank_traffic.format_traffic(traffic)]
            if self.check:
                lines.append("compactfusion: --compression-check: " + {
                    True: "sender and receiver caches bitwise equal",
                    False: "residual caches DIVERGED (details on stderr)",
                    None: "no cache was checked (nothing compressed)"}[self.cache_consistent])
            print("\n".join(lines), flush=True)
            return
        # The group is gone: a collective now would fail or hang, so every rank reports its own bytes.
        rank = os.environ.get("RANK", "?")
        local = {**self.session.stats(), "cache_consistent": None}
        lines = []
        if self.stats:
            lines += [f"compactfusion: {self.session.config.name}, rank {rank} only (the process group was "
                      "destroyed before the ranks could be summed)", rank_traffic.format_traffic(local)]
        if self.check:
            lines.append(f"compactfusion: --compression-check: rank {rank}: the final cache check needs the "
                         "process group, which was already destroyed")
        print("\n".join(lines), flush=True)


def main(argv: list[str] | None = None) -> int:
    orphans.exit_with_parent()  # this rank ends when torchrun (or the launcher) dies
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    ours = argv[:_script_index(argv)]  # the script's own --help goes to the script
    if "-h" in ours or "--help" in ours:
        parser.print_help()
        return 0
    try:
        ours, script, script_argv = split_argv(argv)
        if not os.path.isfile(script):
            raise ValueError(f"script {script!r} does not exist")
        ns = parser.parse_args(ours)
        config = cli_args.compression_config(ns)
    except ValueError as err:
        print(f"compactfusion_xdit.launch: error: {err}", file=sys.stderr)
        return 2
    try:
        script_argv = resolve_model_arg(script_argv, announce=_announce)
    except ValueError as err:
        print(f"compactfusion_xdit.launch: error: {err}", file=sys.stderr)
        return 2
    session = api.install(config)
    sys.argv = [script, *script_argv]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    report = ExitReport(session, stats=bool(ns.compression_stats), check=bool(ns.compression_check))
    with report:
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as done:
            if done.code not in (None, 0):
                raise  # the script's own failure status; no report
    return 1 if report.cache_consistent is False else 0


def _announce(line: str) -> None:
    if _rank() == 0:
        print(f"compactfusion_xdit.launch: {line}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
