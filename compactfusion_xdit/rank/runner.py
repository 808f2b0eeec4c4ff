"""Drop-in replacement for ``xfuser.runner`` (what xfuser's ``xdit`` command runs in every rank).

    # before:  xdit --model FLUX.1-dev --ulysses_degree 2 --prompt "a cat"
    # after:   cfx-xdit --model FLUX.1-dev --ulysses_degree 2 --prompt "a cat" --compression residual-int4
    torchrun --nproc_per_node 2 -m compactfusion_xdit.rank.runner --model /models/flux --ulysses_degree 2 ...

Takes xfuser 0.7.0's runner flags unchanged (``xFuserArgs.add_runner_args``) plus ``--compression*``,
``--prompt_file`` (or repeated ``--prompt``) and ``--dtype``, and serves the same
``xFuserModelRunner`` models. In every rank the patches are installed (`patches.install`) before
xfuser builds its config or the model. ``--model`` takes a registered name (``FLUX.1-dev``, ``SD3.5``,
``Wan2.1-T2V``, ``HunyuanVideo``, ``PixArt-alpha``, ...), a built-in tiny model, or a local diffusers
folder (its pipeline class picks the runner model, see `patches.runner_models`).

Rank 0 shows a progress bar over denoising steps and ends with one summary line (time, bytes saved,
compression ratio); the last rank writes ``<output_directory>/<name>_<i>.png`` (images) or ``.mp4``
(videos; PNG frames + ``.npy`` without PyAV), numbered ``req<NNNN>_`` when several requests are
served, and ``stats.json``.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import torch

from compactfusion_xdit import patches
from compactfusion_xdit.cli import checks, ports
from compactfusion_xdit.cli import flags as cli_args
from compactfusion_xdit.cli.checks import UsageError
from compactfusion_xdit.models import registry
from compactfusion_xdit.patches import cpu_gloo
from compactfusion_xdit.rank import outputs, serving, worker
from compactfusion_xdit.rank import requests as request_list
from compactfusion_xdit.rank import traffic as rank_traffic
from compactfusion_xdit.reliability import orphans

def build_parser() -> argparse.ArgumentParser:
    """xfuser's runner parser (``xFuserArgs.add_runner_args``) plus our flags."""
    cpu_gloo.make_xfuser_importable()
    from xfuser import xFuserArgs
    from xfuser.config import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="cfx-xdit", description="xfuser's model runner with compressed communication")
    xFuserArgs.add_runner_args(parser)
    cli_args.add_compression_args(parser)
    cli_args.add_request_args(parser)
    cli_args.add_verbose_arg(parser)
    parser.add_argument("--dtype", default=None, choices=cli_args.DTYPE_NAMES,
                        help="cast the loaded pipeline (default: the runner model's own dtype)")
    return parser


def resolve_model(model: str, dtype: torch.dtype | None) -> str:
    """The registry key for ``--model``: a registered name, a built-in tiny model or a local folder."""
    from compactfusion_xdit.patches import runner_models

    registered = runner_models.registry()
    if model in registry.BUILTIN_MODELS:
        model = registry.resolve(model)
    elif model in registered and dtype is None:
        return model
    if not os.path.isdir(model):
        if model in registered:
            raise UsageError(f"--dtype applies to local folders only; drop it for the registered model {model!r}")
        raise UsageError(f"--model {model!r} is neither a model registered with xfuser's runner (e.g. FLUX.1-dev, "
                          f"SD3.5, Wan2.1-T2V, HunyuanVideo, PixArt-alpha) nor a local diffusers folder")
    try:
        return runner_models.register_local_folder(model, dtype)
    except runner_models.LocalModelError as err:
        raise UsageError(str(err)) from None


def run(argv: list[str]) -> int:
    """Parse, install, load, serve every request, write outputs; the exit status."""
    from compactfusion_xdit.patches import runner_models
    from compactfusion_xdit.patches._attrs import AttributePatcher

    ns = build_parser().parse_args(argv)
    cli_args.apply_native_settings(ns, argv)  # a built-in's own size and steps where none are given
    config = checks.compression_config(ns)
    try:
        requests = request_list.listed_requests(argv, ns.prompt_file)
    except request_list.RequestError as err:
        raise UsageError(str(err)) from None
    # before xfuser builds its config or the model; `none` still counts what the exchanges send
    patches.install(config, count=not getattr(ns, "use_torch_compile", False))
    ns.model = resolve_model(ns.model, worker.DTYPES.get(ns.dtype) if ns.dtype else None)
    if requests:
        ns.prompt = [requests[0].prompt]  # xfuser validates that a prompt exists
    runtime = AttributePatcher()
    runner_models.apply_cpu(runtime)
    try:
        return _serve(vars(ns), requests)
    finally:
        runtime.restore()


def _serve(config: dict, requests: list | None) -> int:
    from xfuser.core.distributed import get_world_group
    from xfuser.runner import xFuserModelRunner

    outputs.quiet_loading(config.get("verbose", False))
    runner = xFuserModelRunner(config)
    input_args = runner.preprocess_args(config)
    runner.initialize(input_args)
    model = runner.model
    world = get_world_group()
    outputs.quiet_progress(model.pipe, world.rank)
    session = patches.session()
    base = request_list.Request(prompt=input_args.get("prompt"), height=input_args.get("height"),
                                width=input_args.get("width"), num_inference_steps=input_args.get("num_inference_steps"),
                                seed=input_args.get("seed"))
    requests = [r.with_defaults(base.__dict__) for r in requests] if requests else [base]

    def run_one(request):
        args = copy.deepcopy(input_args)
        args.update(request.overrides())
        args["seed"] = request.seed
        return _run_request(runner, model, args)

    served = serving.serve_requests(session, requests, run_one)
    written = _write(model, served, config["output_directory"]) if world.rank == world.world_size - 1 else []
    written = outputs.from_output_rank(written)  # rank 0 names the files, after they exist
    if world.rank == 0:
        if session is not None and session.config.check:
            for s in served:
                print(rank_traffic.check_verdict(s.traffic))
        raw, sent = sum(s.traffic["raw_bytes"] for s in served), sum(s.traffic["sent_bytes"] for s in served)
        name = session.config.name if session is not None else "none"
        print(outputs.summary_line(sum(s.elapsed_s for s in served), len(served), raw, sent, name, written),
              flush=True)
    _cleanup(runner)
    return 0


def _run_request(runner, model, input_args: dict):
    """One request the way ``xFuserModelRunner.run`` serves it (iterations, determinism checks) on
    CUDA; on CPU its core steps (its timing uses CUDA events)."""
    if cpu_gloo.cuda_available():
        output, _ = runner.run(input_args)
        return output
    model._validate_args(input_args)
    input_args = model._split_prompts_for_dp(input_args)
    output, _ = model._run_timed_pipe(input_args)
    return model._gather_dp_outputs(output)


def _write(model, served: list, directory: str) -> list[str]:
    files = []
    for s in served:
        stats = {**s.request.__dict__, "elapsed_s": s.elapsed_s, **s.traffic, "video_backend": outputs.video_backend()}
        videos = s.output is not None and not s.output.images and s.output.videos
        items = None if s.output is None else (s.output.videos if videos else s.output.images)
        size = outputs.produced_size(items)
        if size is not None and size != (stats["height"], stats["width"]):  # the pipeline rounded the size
            stats.update(requested_height=stats["height"], requested_width=stats["width"])
            stats["height"], stats["width"] = size
        files.append(outputs.RequestFiles("videos" if videos else "images", items, stats))
    return outputs.write_request_files(files, directory, model.settings.output_name or "output",
                                       fps=model.settings.fps or 16)


def _cleanup(runner) -> None:
    from xfuser.core.distributed import get_runtime_state

    if cpu_gloo.cuda_available():
        runner.cleanup()
    else:
        get_runtime_state().destroy_distributed_env()


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m compactfusion_xdit.rank.runner`` (one rank)."""
    orphans.exit_with_parent()  # this rank ends when torchrun (or the launcher) dies
    argv = list(sys.argv[1:] if argv is None else argv)
    outputs.quiet_libraries(verbose="--verbose" in argv)  # before xfuser and diffusers are imported
    if not os.environ.get("RANK"):  # like xfuser.runner: a single process without torchrun
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(ports.free_port()))
    return serving.run_rank(lambda: run(argv), prog="cfx-xdit")


if __name__ == "__main__":
    sys.exit(main())
