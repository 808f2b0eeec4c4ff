"""The command-line flags: xfuser's own (``xFuserArgs.add_cli_args``) plus ours, one parser.

    from compactfusion_xdit.cli import flags as args
    ns = args.build_parser().parse_args(["--model", "tiny-flux", "--ulysses_degree", "2",
                                         "--compression", "residual-int4"])
    config = args.compression_config(ns)        # CompressionConfig from every --compression* flag

Used by the launcher (`compactfusion_xdit.cli.launcher`, the ``xfuser`` command) and by each rank
(`compactfusion_xdit.rank.worker`). Like xfuser's parser, dashes and underscores in flag names are
interchangeable (``--compression-warmup`` == ``--compression_warmup``).

`build_parser` imports xfuser (about 10 s on CPU). `add_compactfusion_args` and
`add_launcher_args` do not, so the launcher can check our flags before paying for it.
"""

from __future__ import annotations

import argparse

#: ``--dtype`` spellings (the worker maps them to torch dtypes).
DTYPE_NAMES = ("float32", "fp32", "float16", "fp16", "bfloat16", "bf16")


def _compression_name(value: str) -> str:
    from compactfusion_xdit.core.config import CompressionConfig

    try:
        CompressionConfig.parse(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return value.strip()


def _compression_paths(value: str) -> str:
    from compactfusion_xdit.core.config import CompressionConfig

    try:
        CompressionConfig.parse("none", paths=value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return value


def _compression_schedule(value: str) -> str:
    from compactfusion_xdit.core.config import CompressionConfig

    try:
        CompressionConfig.parse("none", schedule=value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return value


def _auto_floor(value: str) -> str:
    from compactfusion_xdit.core.config import AUTO_CANDIDATES

    if value.strip() not in AUTO_CANDIDATES:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(AUTO_CANDIDATES)}, got {value!r}")
    return value.strip()


def _non_negative_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = -1
    if number < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value!r}")
    return number


def _both_spellings(flag: str) -> list[str]:
    """``--a-b`` and ``--a_b``: xfuser's parser rewrites every dash to an underscore before
    matching, so the underscore spelling must exist; the dashed one is what users read."""
    underscored = "--" + flag[2:].replace("-", "_")
    return [flag] if underscored == flag else [flag, underscored]


def add_compactfusion_args(parser: argparse.ArgumentParser) -> None:
    """Our flags: compression, outputs, dtype, verbosity. Defaults keep xfuser's plain behaviour."""
    group = add_compression_args(parser)
    group.add_argument(*_both_spellings("--output_dir"), dest="output_dir", default="out", metavar="DIR",
                       help="the last rank writes image_0.png (or latents.npy) and stats.json here (default out)")
    group.add_argument("--dtype", default=None, choices=DTYPE_NAMES,
                       help="model dtype (default float32 on CPU, bfloat16 on CUDA)")
    add_verbose_arg(group)
    add_request_args(parser)
    add_mode_args(parser)


def add_verbose_arg(parser) -> None:
    """``--verbose``: the ranks show xfuser's, diffusers' and transformers' logs and warnings
    (hidden by default: a run prints its progress bar and a summary)."""
    parser.add_argument("--verbose", action="store_true",
                        help="show the libraries' log lines, warnings and loading bars (default: progress bar and "
                        "summary only)")


def add_request_args(parser: argparse.ArgumentParser) -> None:
    """``--prompt_file``: many requests served by one launch (see `compactfusion_xdit.rank.requests`)."""
    parser.add_argument(*_both_spellings("--prompt_file"), dest="prompt_file", default=None, metavar="FILE",
                        help="one request per line: a prompt, or a JSON object with prompt and optionally height, "
                        "width, num_inference_steps, seed, negative_prompt; outputs are numbered per request")


def add_compression_args(parser: argparse.ArgumentParser):
    """The ``--compression*`` flags alone (the drop-in runner adds these to xfuser's runner flags)."""
    group = parser.add_argument_group("compactfusion (compressed communication)")
    group.add_argument(*_both_spellings("--compression"), dest="compression", default="none", type=_compression_name,
                       metavar="NAME", help="none (default), e.g. residual-int4, residual-1bit, residual-lowrank-8, "
                       "residual-int4-noef, int8 (plain quantisation), auto (per path from the measured link)")
    group.add_argument(*_both_spellings("--compression-auto-floor"), dest="compression_auto_floor",
                       default="residual-int2", type=_auto_floor, metavar="NAME",
                       help="with --compression auto: the coarsest codec auto may pick, one of none, residual-int8, "
                       "residual-int4, residual-int2 (default), residual-1bit")
    group.add_argument(*_both_spellings("--compression-auto-every"), dest="compression_auto_every", default=0,
                       type=_non_negative_int, metavar="N",
                       help="with --compression auto: measure the links again every N requests (default 0: once per "
                       "launch and request shape)")
    group.add_argument(*_both_spellings("--compression-warmup"), dest="compression_warmup", default=1,
                       type=_non_negative_int, metavar="N", help="first N steps of a request send raw tensors (default 1)")
    group.add_argument(*_both_spellings("--compression-paths"), dest="compression_paths", default="all",
                       type=_compression_paths, metavar="LIST",
                       help="comma list of ulysses,ring,pipefusion,legacy,patch,step, or all (default)")
    group.add_argument(*_both_spellings("--compression-scope"), dest="compression_scope", default="all",
                       choices=("all", "inter-node"), metavar="SCOPE",
                       help="all (default): code every link of the paths; inter-node: code only exchanges between "
                       "nodes, links inside a node stay raw (multi-node runs)")
    group.add_argument(*_both_spellings("--compression-no-ef"), dest="compression_no_ef", action="store_true",
                       help="residual mode without error feedback (ablation)")
    group.add_argument(*_both_spellings("--compression-check"), dest="compression_check", action="store_true",
                       help="after each step verify sender/receiver caches bitwise across ranks (slow)")
    group.add_argument(*_both_spellings("--compression-stats"), dest="compression_stats", action="store_true",
                       help="print the per-path byte table on rank 0")
    group.add_argument(*_both_spellings("--compression-schedule"), dest="compression_schedule", default=None,
                       type=_compression_schedule, metavar="RULES",
                       help="per-step/per-layer codecs, first match wins, e.g. "
                       "'steps=0-1:none; layers=0-3:residual-int8; layers=4- paths=ulysses:residual-1bit' "
                       "(docs/yaml_configs.md)")
    return group


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """``--config`` and ``--dry-run``: read by the ``xfuser`` launcher (`compactfusion_xdit.cli.yaml_config`)."""
    group = parser.add_argument_group("configuration file")
    group.add_argument("--config", default=None, metavar="FILE.yaml",
                       help="settings from a YAML file (configs/, docs/yaml_configs.md); flags on the command line "
                       "override the file")
    group.add_argument(*_both_spellings("--dry-run"), dest="dry_run", action="store_true",
                       help="check the settings, print the launch plan and exit without starting any rank: status 0, "
                       "2 for refused settings, 3 when the model folder does not exist (the plan is still printed)")


def add_own_args(parser: argparse.ArgumentParser) -> None:
    """Every flag of ours (no xfuser import): what `build_parser` adds to xfuser's."""
    add_compactfusion_args(parser)
    add_launcher_args(parser)
    add_config_args(parser)


def add_mode_args(parser: argparse.ArgumentParser) -> None:
    """Patch parallelism (DistriFusion) and step parallelism (ParaStep); see `compactfusion_xdit.modes`.
    Their degrees multiply the world size; xfuser's ``--warmup_steps`` is the displaced mode's warm-up."""
    group = parser.add_argument_group("parallel modes (patch: DistriFusion, step: ParaStep)")
    group.add_argument(*_both_spellings("--patch_parallel_degree"), dest="patch_parallel_degree", type=int, default=1,
                       metavar="N", help="ranks that each own a slice of the image tokens (default 1: off)")
    group.add_argument(*_both_spellings("--patch_parallel_mode"), dest="patch_parallel_mode", default="displaced",
                       choices=("sync", "displaced"), help="sync: fresh K/V every layer; displaced (default): other "
                       "ranks' K/V from the previous step after --warmup_steps synchronous steps")
    group.add_argument(*_both_spellings("--step_parallel_degree"), dest="step_parallel_degree", type=int, default=1,
                       metavar="N", help="ranks that evaluate consecutive steps concurrently (default 1: off)")
    group.add_argument(*_both_spellings("--step_parallel_warmup"), dest="step_parallel_warmup", type=int, default=2,
                       metavar="K", help="steps computed on every rank before step windows start (default 2)")


def add_launcher_args(parser: argparse.ArgumentParser) -> None:
    """torchrun's placement flags, read by the ``xfuser`` launcher only (ranks ignore them)."""
    group = parser.add_argument_group("launcher (torchrun)")
    group.add_argument(*_both_spellings("--nproc_per_node"), dest="nproc_per_node", type=int, default=None,
                       metavar="N", help="ranks on this node (default: the product of the parallel degrees / --nnodes)")
    group.add_argument(*_both_spellings("--nnodes"), dest="nnodes", type=int, default=1, metavar="N",
                       help="number of nodes (default 1)")
    group.add_argument(*_both_spellings("--node_rank"), dest="node_rank", type=int, default=0, metavar="R",
                       help="this node's index (default 0)")
    group.add_argument(*_both_spellings("--master_addr"), dest="master_addr", default=None, metavar="HOST",
                       help="rendezvous host (default 127.0.0.1)")
    group.add_argument(*_both_spellings("--master_port"), dest="master_port", type=int, default=None, metavar="PORT",
                       help="rendezvous port (default: a free port on a single node, 29500 with --nnodes > 1)")


#: The flags `add_launcher_args` defines (underscore spelling), all taking one value.
LAUNCHER_FLAGS = ("--nproc_per_node", "--nnodes", "--node_rank", "--master_addr", "--master_port")


def build_parser() -> argparse.ArgumentParser:
    """xfuser's ``FlexibleArgumentParser`` with ``xFuserArgs.add_cli_args`` plus our flags.

    Imports xfuser (made importable on CPU first).
    """
    from compactfusion_xdit.patches import cpu_gloo

    cpu_gloo.make_xfuser_importable()
    from xfuser import xFuserArgs
    from xfuser.config import FlexibleArgumentParser

    parser = FlexibleArgumentParser(
        prog="xfuser",
        description="xDiT (xfuser 0.7.0) parallel diffusion inference with compressed communication. "
        "Launches one rank per device (torchrun); --model takes a built-in (tiny-flux, tiny-pixart, "
        "tiny-sd3, digits-flux) or a local diffusers folder.",
    )
    xFuserArgs.add_cli_args(parser)
    add_own_args(parser)
    return parser


def compression_config(ns: argparse.Namespace):
    """The `CompressionConfig` the ``--compression*`` flags of `ns` describe.

    ``--compression-no-ef`` turns error feedback off for a residual name (and the schedule's
    residual names), is a no-op with ``none``, and is an error with only plain codecs (they have
    no error feedback to turn off).
    """
    from compactfusion_xdit.core.config import CompressionConfig

    name = getattr(ns, "compression", "none") or "none"
    config = CompressionConfig.parse(
        name,
        warmup=getattr(ns, "compression_warmup", 1),
        paths=getattr(ns, "compression_paths", "all"),
        check=bool(getattr(ns, "compression_check", False)),
        schedule=getattr(ns, "compression_schedule", None),
        auto_floor=getattr(ns, "compression_auto_floor", "residual-int2"),
        auto_every=getattr(ns, "compression_auto_every", 0),
        scope=getattr(ns, "compression_scope", "all"),
    )
    modes = {config.mode} | {CompressionConfig.parse(rule.codec).mode for rule in config.schedule}
    if getattr(ns, "compression_no_ef", False) and modes != {"none"}:
        if not modes & {"residual", "auto"}:
            raise ValueError(f"--compression-no-ef only applies to residual compression, not {name!r}; "
                             f"use e.g. residual-{config.codec}")
        config = CompressionConfig.parse(config, error_feedback=False)
    return config


def given(argv: list[str], dest: str) -> bool:
    """Whether the command line `argv` sets the flag of `dest` (``--dest v``, ``--dest=v``, dashes or
    underscores), as opposed to leaving it at the parser's default."""
    return any(arg.startswith("--") and arg[2:].partition("=")[0].replace("-", "_") == dest for arg in argv)


def apply_native_settings(ns: argparse.Namespace, argv: list[str]) -> dict:
    """A built-in ``--model`` runs at its own size and step count (`registry.NATIVE_SETTINGS`), not
    xfuser's 1024x1024 / 20 steps: each setting the command line does not give is replaced in `ns`.
    Returns the settings applied ({} for a local folder or when every one was given)."""
    from compactfusion_xdit.models import registry

    applied = {dest: value for dest, value in registry.NATIVE_SETTINGS.get(getattr(ns, "model", None), {}).items()
               if hasattr(ns, dest) and not given(argv, dest)}
    for dest, value in applied.items():
        setattr(ns, dest, value)
    return applied


def compile_conflict(ns: argparse.Namespace) -> str | None:
    """Why ``--use_torch_compile`` cannot go with ``--compression`` (None when it can)."""
    name = getattr(ns, "compression", "none") or "none"
    if getattr(ns, "use_torch_compile", False) and name != "none":
        # Not proven: the compressed exchanges are eager Python around dist.all_to_all_single /
        # isend, with per-step cache state that a traced graph would freeze.
        return (f"--use_torch_compile with --compression {name} is not supported (the compressed exchanges "
                "run eagerly with per-step caches); drop --use_torch_compile or use --compression none")
    return None
