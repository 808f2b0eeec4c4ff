"""Drop-in replacement for ``xfuser.runner`` (what xfuser's ``xdit`` command runs in every rank).

    # before:  xdit --model FLUX.1-dev --ulysses_degree 2 --prompt "a cat"
    # after:   cfx-xdit --model FLUX.1-dev --ulysses_degree 2 --prompt "a cat" --compression residual-int4
    torchrun --nproc_per_node 2 -m compactfusion_xdit.runner --model /models/flux --ulysses_degree 2 ...

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
import json
import os
import sys
import time
from typing import Any

import torch

from compactfusion_xdit import args as cli_args
from compactfusion_xdit import outputs, patches, request_list
from compactfusion_xdit.patches import cpu_gloo

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


class RunnerError(ValueError):
    """A setting the user can fix; the message says what to change."""


def build_parser() -> argparse.ArgumentParser:
    """xfuser's runner parser (``xFuserArgs.add_runner_args``) plus our flags."""
    cpu_gloo.make_xfuser_importable()
    from xfuser import xFuserArgs
    from xfuser.config import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="cfx-xdit", description="xfuser's model runner with compressed communication")
    xFuserArgs.add_runner_args(parser)
    cli_args.add_compression_args(parser)
    cli_args.add_request_args(parser)
    parser.add_argument("--dtype", default=None, choices=cli_args.DTYPE_NAMES,
                        help="cast the loaded pipeline (default: the runner model's own dtype)")
    return parser


def check_flags(ns: argparse.Namespace) -> Any:
    """The `CompressionConfig`; RunnerError for combinations we refuse."""
    try:
        config = cli_args.compression_config(ns)
    except ValueError as err:
        raise RunnerError(str(err)) from None
    if config.enabled and ns.use_fp8_comms:
        raise RunnerError(f"--use_fp8_comms and --compression {config.name} both change the Ulysses exchange; "
                          "drop one of them")
    if cli_args.compile_conflict(ns):
        raise RunnerError(cli_args.compile_conflict(ns))
    return config


def resolve_model(model: str, dtype: torch.dtype | None) -> str:
    """The registry key for ``--model``: a registered name, a built-in tiny model or a local folder."""
    from compactfusion_xdit.models import tiny
    from compactfusion_xdit.patches import runner_models

    registry = runner_models.registry()
    if model in tiny.BUILTIN_MODELS:
        model = tiny.materialize(model)
    elif model in registry and dtype is None:
        return model
    if not os.path.isdir(model):
        if model in registry:
            raise RunnerError(f"--dtype applies to local folders only; drop it for the registered model {model!r}")
        raise RunnerError(f"--model {model!r} is neither a model registered with xfuser's runner (e.g. FLUX.1-dev, "
                          f"SD3.5, Wan2.1-T2V, HunyuanVideo, PixArt-alpha) nor a local diffusers folder")
    try:
        return runner_models.register_local_folder(model, dtype)
    except runner_models.LocalModelError as err:
        raise RunnerError(str(err)) from None


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def run(argv: list[str]) -> int:
    """Parse, install, load, serve every request, write outputs; the exit status."""
    from compactfusion_xdit import worker
    from compactfusion_xdit.patches import runner_models
    from compactfusion_xdit.patches._attrs import AttributePatcher

    ns = build_parser().parse_args(argv)
    config = check_flags(ns)
    try:
        requests = request_list.listed_requests(argv, ns.prompt_file)
    except request_list.RequestError as err:
        raise RunnerError(str(err)) from None
    patches.install(config)  # before xfuser builds its config or the model
    ns.model = resolve_model(ns.model, DTYPES.get(ns.dtype) if ns.dtype else None)
    if requests:
        ns.prompt = [requests[0].prompt]  # xfuser validates that a prompt exists
    runtime = AttributePatcher()
    runner_models.apply_cpu(runtime)
    try:
        return _serve(vars(ns), requests, worker)
    finally:
        runtime.restore()


def _serve(config: dict, requests: list | None, worker) -> int:
    from xfuser.core.distributed import get_world_group
    from xfuser.runner import xFuserModelRunner

    runner = xFuserModelRunner(config)
    input_args = runner.preprocess_args(config)
    runner.initialize(input_args)
    model = runner.model
    rank = get_world_group().rank
    outputs.quiet_progress(model.pipe, rank)
    session = patches.session()
    base = request_list.Request(prompt=input_args.get("prompt"), height=input_args.get("height"),
                                width=input_args.get("width"), num_inference_steps=input_args.get("num_inference_steps"),
                                seed=input_args.get("seed"))
    requests = [r.with_defaults(base.__dict__) for r in requests] if requests else [base]
    results = []
    for request in requests:
        args = copy.deepcopy(input_args)
        args.update(request.overrides())
        args["seed"] = request.seed
        worker.begin_request_state(session)
        start = time.perf_counter()
        output = _run_request(runner, model, args)
        elapsed = time.perf_counter() - start
        traffic = worker.compression_traffic(session)
        if session is not None:
            session.state.reset()  # no cache entry outlives its request
        results.append((request, output, elapsed, traffic))
    if rank == get_world_group().world_size - 1:
        for path in _write(model, results, config["output_directory"]):
            print(f"wrote {path}")
    if rank == 0:
        raw, sent = sum(r[3]["raw_bytes"] for r in results), sum(r[3]["sent_bytes"] for r in results)
        name = session.config.name if session is not None else "none"
        print(outputs.summary_line(sum(r[2] for r in results), len(results), raw, sent, name), flush=True)
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


def _write(model, results: list, directory: str) -> list[str]:
    written, stats = [], []
    name = model.settings.output_name or "output"
    for n, (request, output, elapsed, traffic) in enumerate(results):
        stem = os.path.join(directory, (f"req{n:04d}_" if len(results) > 1 else "") + name)
        files = []
        if output is not None and output.images:
            files = outputs.save_images(output.images, stem)
        elif output is not None and output.videos:
            for i, video in enumerate(output.videos):
                files += outputs.save_video(video, f"{stem}_{i}", fps=model.settings.fps or 16)
        written += files
        stats.append({**request.__dict__, "elapsed_s": elapsed, **traffic,
                      "outputs": [os.path.relpath(p, directory) for p in files]})
    path = os.path.join(directory, "stats.json")
    os.makedirs(directory, exist_ok=True)
    with open(path, "w") as f:
        json.dump({"requests": stats, "video_backend": outputs.video_backend()}, f, indent=2, default=str)
    return written + [path]


def _cleanup(runner) -> None:
    from xfuser.core.distributed import get_runtime_state

    if cpu_gloo.cuda_available():
        runner.cleanup()
    else:
        get_runtime_state().destroy_distributed_env()


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m compactfusion_xdit.runner`` (one rank)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not os.environ.get("RANK"):  # like xfuser.runner: a single process without torchrun
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    try:
        return run(argv)
    except RunnerError as err:
        print(f"cfx-xdit: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # one line for users; CFX_DEBUG=1 shows the traceback
        if os.environ.get("CFX_DEBUG"):
            raise
        print(f"cfx-xdit: error (rank {_rank()}): {type(err).__name__}: {err}  [set CFX_DEBUG=1 for the traceback]",
              file=sys.stderr)
        return 1


def _free_port() -> int:
    from compactfusion_xdit.testing import free_port

    return free_port()


if __name__ == "__main__":
    sys.exit(main())
