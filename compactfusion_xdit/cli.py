"""The ``xfuser`` command: check the flags, then launch one rank per device with torchrun.

    xfuser --model tiny-flux --ulysses_degree 2 --height 64 --width 64 \\
        --num_inference_steps 8 --prompt "a cat" --compression residual-int4 --output_dir out

Like xfuser's own ``xdit`` command, the number of ranks is the product of the parallel degrees
(data, Ulysses, ring, PipeFusion, tensor; ``--use_cfg_parallel`` counts 2), and the ranks run
``python -m torch.distributed.run ... -m compactfusion_xdit.worker <the same flags>``. Mistakes
that would otherwise surface in every rank after the xfuser import (an unknown model, degrees
that do not match the rank count, ``--use_fp8_comms`` with compression, an unknown compression
name) are reported here within seconds, as one line, with exit status 2. Without CUDA the ranks
use gloo with one thread each (unless ``OMP_NUM_THREADS`` is set) and a free port.
The exit status is torchrun's: non-zero when any rank fails.

``--config FILE.yaml`` reads the settings from a file (`compactfusion_xdit.yaml_config`; flags on the
command line override it) and ``--dry-run`` runs the checks and prints the plan without launching
(`compactfusion_xdit.dry_run`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import signal
import socket
import subprocess
import sys

from compactfusion_xdit import args as cli_args
from compactfusion_xdit import dry_run, ports, request_list, yaml_config
from compactfusion_xdit.modes import layout as modes_layout

#: xfuser's degree flags and the ``--use_cfg_parallel`` switch: together they fix the rank count.
DEGREE_FLAGS = ("--data_parallel_degree", "--ulysses_degree", "--ring_degree", "--pipefusion_parallel_degree",
                "--tensor_parallel_degree")
WORKER_MODULE = "compactfusion_xdit.worker"
DEFAULT_MULTINODE_PORT = 29500


class LaunchError(ValueError):
    """A setting the user can fix before any rank starts; the message says what to change."""


class _RaisingParser(argparse.ArgumentParser):
    def error(self, message: str):
        raise LaunchError(message)


@dataclasses.dataclass(frozen=True)
class LaunchPlan:
    """Where the ranks go: torchrun's placement flags."""

    world_size: int
    nproc_per_node: int
    nnodes: int
    node_rank: int
    master_addr: str
    master_port: int


def _normalise_flag_names(argv: list[str]) -> list[str]:
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
    ns, _ = parser.parse_known_args(_normalise_flag_names(argv))
    return ns


def world_size(ns: argparse.Namespace) -> int:
    """The number of ranks the parallel degrees need (as xfuser's ``xdit`` computes it)."""
    for flag in DEGREE_FLAGS:
        value = getattr(ns, flag[2:])
        if value < 1:
            raise LaunchError(f"{flag} {value} must be at least 1")
    degrees = [getattr(ns, flag[2:]) for flag in DEGREE_FLAGS]
    return math.prod(degrees) * (2 if ns.use_cfg_parallel else 1) * modes_layout.total_degree(ns)


def _describe_degrees(ns: argparse.Namespace) -> str:
    parts = [f"{flag[2:].replace('_parallel_degree', '').replace('_degree', '')} {getattr(ns, flag[2:])}"
             for flag in DEGREE_FLAGS]
    mode = modes_layout.describe(ns)
    return " x ".join(parts + [f"cfg {2 if ns.use_cfg_parallel else 1}"] + ([mode] if mode else []))


def model_path(model: str | None) -> str:
    """The diffusers folder of `model` (a built-in is materialised once, here); LaunchError if neither."""
    from compactfusion_xdit.models import tiny

    builtins = ", ".join(tiny.BUILTIN_MODELS)
    if model is None:
        raise LaunchError(f"no --model given; pass a built-in ({builtins}) or a local diffusers folder")
    if model in tiny.BUILTIN_MODELS:
        if not tiny.is_materialized(model):
            print(f"xfuser: building the built-in model {model} into {tiny.cached_path(model)} (once)", file=sys.stderr)
        return tiny.materialize(model)
    if not os.path.isdir(model):
        raise LaunchError(f"--model {model!r} is neither a built-in model ({builtins}) nor a local folder; "
                          "models are not downloaded, pass a diffusers folder (save_pretrained output)")
    if not os.path.isfile(os.path.join(model, "model_index.json")):
        raise LaunchError(f"--model {model!r} has no model_index.json; pass a diffusers folder (save_pretrained output)")
    return model


def _attention_heads(path: str) -> int | None:
    config = os.path.join(path, "transformer", "config.json")
    if not os.path.isfile(config):
        return None
    with open(config) as f:
        return json.load(f).get("num_attention_heads")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def plan_launch(ns: argparse.Namespace, check_model: bool = True) -> LaunchPlan:
    """Check the launcher-visible settings; return the placement. Raises LaunchError.
    ``check_model=False`` skips the model folder (and its head count): the dry run of a config
    whose model path is a placeholder."""
    if ns.use_fp8_comms and ns.compression != "none":
        raise LaunchError(f"--use_fp8_comms and --compression {ns.compression} both change the Ulysses exchange; "
                          "drop one of them")
    if cli_args.compile_conflict(ns):
        raise LaunchError(cli_args.compile_conflict(ns))
    try:
        cli_args.compression_config(ns)
        modes_layout.check(ns)
        if getattr(ns, "prompt_file", None):
            request_list.load_prompt_file(ns.prompt_file)  # a bad line fails here, not in every rank
    except ValueError as err:
        raise LaunchError(str(err)) from None
    world = world_size(ns)
    if ns.nnodes < 1 or not 0 <= ns.node_rank < ns.nnodes:
        raise LaunchError(f"--node_rank {ns.node_rank} must lie in [0, --nnodes {ns.nnodes})")
    if ns.nproc_per_node is None:
        if world % ns.nnodes:
            raise LaunchError(f"the parallel degrees ({_describe_degrees(ns)}) need {world} ranks, "
                              f"which {ns.nnodes} nodes cannot share evenly; change the degrees or --nnodes")
        nproc = world // ns.nnodes
    else:
        nproc = ns.nproc_per_node
        if nproc * ns.nnodes != world:
            raise LaunchError(f"the parallel degrees multiply to {world} ({_describe_degrees(ns)}) but "
                              f"--nproc_per_node {nproc} x --nnodes {ns.nnodes} gives {nproc * ns.nnodes} ranks; "
                              f"drop --nproc_per_node or change the degrees so they multiply to {nproc * ns.nnodes}")
    path = model_path(ns.model) if check_model else None
    heads = _attention_heads(path) if path else None
    if heads is not None and heads % ns.ulysses_degree:
        raise LaunchError(f"the model has {heads} attention heads, not divisible by --ulysses_degree "
                          f"{ns.ulysses_degree}; use a Ulysses degree that divides {heads} (move the rest to --ring_degree)")
    if ns.nnodes > 1 and ns.master_addr is None:
        raise LaunchError(f"--nnodes {ns.nnodes} needs --master_addr (the address of node 0, the same on every node)")
    try:
        ports.check_master_port(ns.master_port, ns.node_rank)
    except ports.PortInUse as err:
        raise LaunchError(str(err)) from None
    port = ns.master_port if ns.master_port is not None else (
        DEFAULT_MULTINODE_PORT if ns.nnodes > 1 else _free_port())
    return LaunchPlan(world, nproc, ns.nnodes, ns.node_rank, ns.master_addr or "127.0.0.1", port)


def torchrun_command(plan: LaunchPlan, worker_argv: list[str],
                     target: tuple[str, ...] = ("-m", WORKER_MODULE)) -> list[str]:
    """The torchrun command line; `target` is what each rank runs (``-m module`` or a script path)."""
    return [
        sys.executable, "-m", "torch.distributed.run",
        f"--nproc_per_node={plan.nproc_per_node}", f"--nnodes={plan.nnodes}", f"--node_rank={plan.node_rank}",
        f"--master_addr={plan.master_addr}", f"--master_port={plan.master_port}",
        *target, *worker_argv,
    ]


def launch_env(cuda: bool) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not cuda:
        env.setdefault("OMP_NUM_THREADS", "1")  # ranks share the CPU cores
        env.setdefault("MKL_NUM_THREADS", env["OMP_NUM_THREADS"])
    return env


def run_to_completion(cmd: list[str], env: dict[str, str]) -> int:
    """Run torchrun in its own process group and return its exit status (128 + N for signal N).
    Ctrl-C / SIGTERM stop every rank; torchrun stops the others when one rank fails."""
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)

    def stop(signum, frame):
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return code if code >= 0 else 128 - code


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``xfuser`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        cli_args.build_parser().print_help()
        return 0
    try:
        argv = yaml_config.expand_argv(argv)  # --config FILE: the file's flags, then the command line's
        argv, dry = dry_run.split(argv)
        if dry:
            print(dry_run.report(argv))
            return 0
        dry_run.check_flags(argv)  # every flag's value, as the ranks will parse it: refused here, not in each rank
        plan = plan_launch(preparse(argv))
    except (LaunchError, yaml_config.ConfigError) as err:
        print(f"xfuser: error: {err}", file=sys.stderr)
        return 2
    import torch

    return run_to_completion(torchrun_command(plan, argv), launch_env(torch.cuda.is_available()))


if __name__ == "__main__":
    sys.exit(main())
