"""Per-rank entry point: one xfuser run with (optionally) compressed communication.

    torchrun --nproc_per_node 2 -m compactfusion_xdit.rank.worker --model tiny-flux \\
        --ulysses_degree 2 --num_inference_steps 4 --height 64 --width 64 \\
        --prompt "a cat" --compression none --output_type latent --output_dir out/

Each rank installs the patches, builds xfuser's configs from the shared argument parser
(xfuser's own flags plus ours), loads the model (a built-in tiny name or a local diffusers
folder), and runs the pipeline with the seed. The last rank writes ``output_dir/image_0.png``
(or ``latents.npy`` with ``--output_type latent``) and ``output_dir/stats.json``.

Compression: ``--compression NAME`` with ``--compression-warmup N``, ``--compression-paths LIST``,
``--compression-no-ef`` builds the `CompressionConfig` handed to ``patches.install``.
``stats.json`` then carries the traffic summed over all ranks: ``raw_bytes`` (what the
uncompressed exchanges would send), ``sent_bytes``, ``ratio``, ``paths: {path: {raw_bytes,
sent_bytes, messages}}``, and ``cache_consistent`` (``--compression-check``: sender and receiver
caches compared bitwise across ranks after every step and after the run; null when not checked).
``--compression-stats`` prints the per-path table on rank 0, ``--compression-check`` one verdict
line. With ``--compression none`` a session that codes nothing counts what the exchanges send
(``patches.install(config, count=True)``): raw_bytes == sent_bytes, ratio 1.0.

A built-in ``--model`` runs at its own size and step count unless the flags are given
(`registry.NATIVE_SETTINGS`); ``stats.json``'s height and width are those of the image made.
Without ``--verbose`` the libraries' log lines, warnings and loading bars are hidden.

Many requests, one launch: ``--prompt_file FILE`` (one prompt or JSON object per line, see
`compactfusion_xdit.rank.requests`) or repeated ``--prompt`` serve every request through the same
ranks; each starts with empty caches, drops them when it ends, and is written as
``req<NNNN>_image_<i>.png`` (or ``req<NNNN>_latents.npy``) with one ``stats.json`` listing them.
Rank 0 shows a progress bar over denoising steps and ends with one summary line (time, the file
written, bytes saved, ratio). Wan2.1 T2V and HunyuanVideo folders load through xfuser's runner models
(`patches.runner_models`), CogVideoX through ``xFuserCogVideoXPipeline``; videos (those and Stable
Video Diffusion) are written as ``video_<i>.mp4`` (PNG frames + ``.npy`` without PyAV). The UNet
pipelines (SVD, AudioLDM2) load as plain diffusers pipelines (`patches.unet_pipelines`; step
parallelism only); AudioLDM2 writes ``audio_<i>.wav`` at its vocoder's sample rate plus ``audio.npy``.

In-process use (tests): ``run_pipeline(args) -> RunResult`` with ``args`` from ``parse_args``;
``serve(args, requests) -> [RunResult]``; or ``load_pipeline(args)`` once, then
``call_pipeline(loaded, args, prompt=..., height=...)`` per request.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Any

import torch

from compactfusion_xdit import modes, patches
from compactfusion_xdit.cli import checks
from compactfusion_xdit.cli import flags as cli_args
from compactfusion_xdit.cli.checks import UsageError
from compactfusion_xdit.models import registry
from compactfusion_xdit.patches import cpu_gloo
from compactfusion_xdit.rank import outputs, serving
from compactfusion_xdit.rank import requests as request_list
from compactfusion_xdit.rank import traffic as rank_traffic
from compactfusion_xdit.reliability import faults, liveness, orphans

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


@dataclasses.dataclass
class RunResult:
    """What one rank produced. ``output`` is the pipeline's output on the rank that writes files
    (latents tensor for ``--output_type latent``, else a list of PIL images); None elsewhere."""

    rank: int
    world_size: int
    is_output_rank: bool
    output: Any
    stats: dict


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The rank's settings; a built-in model gets its own size and step count where the command
    line gives none (`cli.flags.apply_native_settings`)."""
    cpu_gloo.make_xfuser_importable()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = cli_args.build_parser().parse_args(argv)
    cli_args.apply_native_settings(args, argv)
    return args


def resolve_model_path(model: str) -> str:
    """A built-in model name -> its folder (built once); otherwise a checked local diffusers folder."""
    try:
        return registry.resolve(model)
    except registry.ModelError as err:
        raise UsageError(str(err)) from None


def pipeline_class_name(model_path: str) -> str:
    try:
        return registry.pipeline_class_name(model_path)
    except registry.ModelError as err:
        raise UsageError(str(err)) from None


def model_dtype(args: argparse.Namespace) -> torch.dtype:
    name = getattr(args, "dtype", None)
    if name:
        return DTYPES[name]
    return torch.bfloat16 if torch.cuda.is_available() else torch.float32


def _call_kwargs(pipe, args: argparse.Namespace, input_config, generator) -> dict:
    import inspect

    wanted = {
        "height": input_config.height,
        "width": input_config.width,
        "prompt": input_config.prompt,
        "negative_prompt": input_config.negative_prompt,
        "num_inference_steps": input_config.num_inference_steps,
        "guidance_scale": input_config.guidance_scale,
        "max_sequence_length": input_config.max_sequence_length,
        "use_resolution_binning": input_config.use_resolution_binning,
        "num_frames": input_config.num_frames,
        "output_type": input_config.output_type,
        "generator": generator,
    }
    accepted = inspect.signature(type(pipe).__call__).parameters
    named = [p for p in accepted.values() if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if not named and hasattr(pipe, "module"):
        # an xfuser wrapper that only forwards (xFuserStableDiffusionXLPipeline): the pipeline's own
        accepted = inspect.signature(type(pipe.module).__call__).parameters
    return {k: v for k, v in wanted.items() if k in accepted}


@dataclasses.dataclass
class Loaded:
    """A rank's ready pipeline: xfuser's configs built, model loaded, compression installed."""

    pipe: Any
    input_config: Any
    class_name: str
    dtype: torch.dtype
    config: Any  # CompressionConfig
    mode: Any = None  # the installed patch/step parallel mode (compactfusion_xdit.modes), if any


def load_pipeline(args: argparse.Namespace) -> Loaded:
    """Install the patches, build xfuser's configs (initialises torch.distributed) and load the model."""
    config = checks.compression_config(args)
    # `none` still counts what the exchanges send (a session that codes nothing); not under
    # torch.compile, which should trace the stock exchange
    patches.install(config, count=not getattr(args, "use_torch_compile", False))
    session = patches.session()
    if session is not None:  # an installation reused by a second run in this process counts afresh
        session.reset_stats()
    from xfuser import xFuserArgs
    import xfuser
    from xfuser.core.distributed import get_world_group

    outputs.quiet_loading(getattr(args, "verbose", False))
    model_path = resolve_model_path(args.model)
    class_name = pipeline_class_name(model_path)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    checks.check_settings(args, model_path, class_name, world_size)
    if not torch.distributed.is_initialized() and "MASTER_ADDR" not in os.environ:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29500"),
                          RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    try:  # the world group with a bounded timeout, before xfuser builds its groups
        started = liveness.init_process_group(xfuser.envs.get_torch_distributed_backend())
    except ValueError as err:
        raise UsageError(str(err)) from None
    if started or torch.distributed.is_initialized():
        # create_config skips xfuser's own set-up when the group exists; this call is idempotent and
        # also restores xfuser's world group after destroy_distributed_environment (a second load)
        from xfuser.core.distributed import init_distributed_environment

        init_distributed_environment()

    engine_args = xFuserArgs.from_cli_args(args)
    engine_args.model = model_path
    engine_args.data_parallel_degree = modes.layout.xfuser_data_parallel_degree(args)  # the modes' ranks
    engine_config, input_config = engine_args.create_config()
    dtype = model_dtype(args)
    check_ranks_agree(args, config, input_config, dtype)  # before the model is built
    liveness.start_liveness()  # so a failure can name a lost rank
    engine_config.runtime_config.dtype = dtype  # sizes PipeFusion receive buffers (default fp16)

    if class_name in registry.UNET_PIPELINES:
        from compactfusion_xdit.patches import unet_pipelines

        pipe = unet_pipelines.load(model_path, engine_config, dtype)
    elif class_name in registry.RUNNER_MODEL_PIPELINES:
        from compactfusion_xdit.patches import runner_models

        settings = {"prompt": input_config.prompt, "height": input_config.height, "width": input_config.width,
                    "num_inference_steps": input_config.num_inference_steps, "seed": input_config.seed,
                    "num_frames": input_config.num_frames}
        pipe = runner_models.load_with_runner_model(model_path, engine_args, settings, dtype)
    else:
        pipeline_cls = getattr(xfuser, registry.PIPELINES[class_name])
        pipe = pipeline_cls.from_pretrained(model_path, engine_config=engine_config, torch_dtype=dtype)
    device = torch.device("cuda", get_world_group().local_rank) if torch.cuda.is_available() else torch.device("cpu")
    pipe = pipe.to(device)
    mode = modes.install(pipe, args, session)  # patch / step parallelism; None when off
    faults.install(pipe, get_world_group().rank)  # CFX_FAULT (reliability tests); nothing when unset
    return Loaded(pipe, input_config, class_name, dtype, config, mode)


def check_ranks_agree(args: argparse.Namespace, config, input_config, dtype: torch.dtype) -> None:
    """Every rank must run the same compression, layout, model, input and versions (collective)."""
    from compactfusion_xdit.reliability import consistency

    fields = consistency.run_fields(
        compression=config.to_dict(), parallel=checks.parallel_settings(args), model=args.model, dtype=str(dtype),
        world_size=torch.distributed.get_world_size(),
        input={"height": input_config.height, "width": input_config.width, "seed": input_config.seed,
               "num_inference_steps": input_config.num_inference_steps, "output_type": input_config.output_type})
    try:
        consistency.check_ranks(fields)
    except consistency.ConfigMismatch as err:
        raise UsageError(str(err)) from None


def call_pipeline(loaded: Loaded, args: argparse.Namespace, seed: int | None = None, **overrides) -> Any:
    """One request (``pipe(...)``) with the run's settings; `overrides` replace call arguments
    (e.g. ``prompt=``, ``height=``, ``width=``). The generator is seeded afresh each call
    (`seed`, default the run's ``--seed``)."""
    generator = torch.Generator(device="cpu").manual_seed(loaded.input_config.seed if seed is None else seed)
    kwargs = _call_kwargs(loaded.pipe, args, loaded.input_config, generator)
    kwargs.update(overrides)
    if loaded.class_name in registry.UNET_PIPELINES:
        from compactfusion_xdit.patches import unet_pipelines

        kwargs = unet_pipelines.call_arguments(loaded.pipe, kwargs, getattr(args, "img_file_path", None))
    return loaded.pipe(**kwargs)


def run_pipeline(args: argparse.Namespace) -> RunResult:
    """Run one request on this rank (torch.distributed env vars set, or a single process)."""
    return serve(args)[0]


def default_request(args: argparse.Namespace, input_config) -> request_list.Request:
    """The run's own settings as a request (what a launch without a prompt list serves)."""
    return request_list.Request(prompt=input_config.prompt, height=input_config.height, width=input_config.width,
                                num_inference_steps=input_config.num_inference_steps, seed=input_config.seed)


def serve(args: argparse.Namespace, requests: list | None = None, finish=None) -> list[RunResult]:
    """Load once, then run each request (default: the run's own settings) through the same ranks
    (`serving.serve_requests`: caches start empty and are dropped after each; traffic counted alone).
    Each result's ``stats`` also records the rank's resident memory after its request.
    `finish(results)`, if given, runs on every rank before the process groups are destroyed."""
    from xfuser.core.distributed import get_runtime_state, get_world_group

    loaded = load_pipeline(args)
    world = get_world_group()
    outputs.quiet_progress(loaded.pipe, world.rank)
    defaults = dataclasses.asdict(default_request(args, loaded.input_config))
    requests = [r.with_defaults(defaults) for r in requests] if requests else [default_request(args, loaded.input_config)]
    session = patches.session()

    def run_one(request):
        return call_pipeline(loaded, args, seed=request.seed, **request.overrides())

    served = serving.serve_requests(session, requests, run_one)
    results = [_request_result(loaded, args, world, s, session) for s in served]
    if finish is not None:
        finish(results)
    get_runtime_state().destroy_distributed_env()
    return results


def _request_result(loaded: Loaded, args, world, served: serving.Served, session) -> RunResult:
    from xfuser.core.distributed import get_runtime_state

    is_output_rank = world.rank == world.world_size - 1
    if world.rank == 0:
        if getattr(args, "compression_stats", False):
            print(rank_traffic.format_traffic(served.traffic))
        if loaded.config.check:
            print(rank_traffic.check_verdict(served.traffic), flush=True)
    out, request = served.output, served.request
    output = None
    if is_output_rank and out is not None:
        output = next(getattr(out, name) for name in ("frames", "audios", "images") if hasattr(out, name))
    size = outputs.produced_size(output) or (request.height, request.width)
    requested = {} if size == (request.height, request.width) else {"requested_height": request.height,
                                                                    "requested_width": request.width}
    stats = {
        "world_size": world.world_size,
        "elapsed_s": served.elapsed_s,
        "model": args.model,
        "pipeline": loaded.class_name,
        "dtype": str(loaded.dtype).replace("torch.", ""),
        "prompt": request.prompt,
        "height": size[0],  # what the pipeline made (it rounds sizes down to what the model can draw)
        "width": size[1],
        **requested,
        "num_inference_steps": request.num_inference_steps,
        "seed": request.seed,
        "parallel": checks.parallel_settings(args),
        "compression": loaded.config.name,
        "compression_config": loaded.config.to_dict(),
        "attention_backend": get_runtime_state().attention_backend.name,
        **({"sample_rate": _sample_rate(loaded.pipe)} if loaded.class_name in registry.AUDIO_PIPELINES else {}),
        "cache_entries_after": session.stats()["cache_entries"] if session is not None else 0,
        "rss_bytes": resident_bytes(),
        **served.traffic,
    }
    return RunResult(world.rank, world.world_size, is_output_rank, output, stats)


def _sample_rate(pipe) -> int | None:
    from compactfusion_xdit.patches import unet_pipelines

    return unet_pipelines.sample_rate(pipe)


def resident_bytes() -> int | None:
    """This process's resident set size; None where the system does not say (no /proc)."""
    if not os.path.exists("/proc/self/statm"):
        return None
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def write_request_outputs(results: list[RunResult], output_dir: str, output_type: str) -> list[str]:
    """The output rank's files and stats.json (`outputs.write_request_files`): ``image_<i>.png``,
    ``video_<i>.mp4`` or ``latents.npy``, numbered ``req<NNNN>_`` when several requests were served."""
    if output_type == "latent":
        kind, name = "latents", "latents"
    elif results[0].stats["pipeline"] in registry.VIDEO_PIPELINES:
        kind, name = "videos", "video"
    elif results[0].stats["pipeline"] in registry.AUDIO_PIPELINES:
        kind, name = "audio", "audio"
    else:
        kind, name = "images", "image"
    files = [outputs.RequestFiles(kind, r.output, r.stats) for r in results]
    return outputs.write_request_files(files, output_dir, name, fps=16)


def request_summary(results: list[RunResult], written: list[str] | None = None) -> str:
    """The closing line: time, what was written, bytes saved, ratio over every request of the launch."""
    raw, sent = sum(r.stats["raw_bytes"] for r in results), sum(r.stats["sent_bytes"] for r in results)
    elapsed = sum(r.stats["elapsed_s"] for r in results)
    return outputs.summary_line(elapsed, len(results), raw, sent, results[0].stats["compression"], written)


def main(argv: list[str] | None = None) -> int:
    orphans.exit_with_parent()  # this rank ends when torchrun (or the launcher) dies
    argv = list(sys.argv[1:] if argv is None else argv)
    outputs.quiet_libraries(verbose="--verbose" in argv)  # before xfuser and diffusers are imported
    return serving.run_rank(lambda: _run(argv))


def _run(argv: list[str]) -> int:
    args = parse_args(argv)
    try:
        requests = request_list.listed_requests(argv, args.prompt_file)
    except request_list.RequestError as err:
        raise UsageError(str(err)) from None

    def finish(results: list[RunResult]) -> None:
        written = []
        if results[0].is_output_rank:
            written = write_request_outputs(results, args.output_dir, args.output_type)
        written = outputs.from_output_rank(written)  # rank 0 names the files, after they exist
        if results[0].rank == 0:
            print(request_summary(results, written), flush=True)

    serve(args, requests, finish)
    return 0


if __name__ == "__main__":
    code = main()
    if code:  # a failed rank must not wait in interpreter shutdown for peers that are gone
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
