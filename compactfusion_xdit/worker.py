"""Per-rank entry point: one xfuser run with (optionally) compressed communication.

    torchrun --nproc_per_node 2 -m compactfusion_xdit.worker --model tiny-flux \\
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
``--compression-stats`` prints the per-path table on rank 0. With ``--compression none`` nothing is
counted (zeros, ratio 1.0).

Many requests, one launch: ``--prompt_file FILE`` (one prompt or JSON object per line, see
`compactfusion_xdit.request_list`) or repeated ``--prompt`` serve every request through the same
ranks; each starts with empty caches, drops them when it ends, and is written as
``req<NNNN>_image_<i>.png`` (or ``req<NNNN>_latents.npy``) with one ``stats.json`` listing them.
Rank 0 shows a progress bar over denoising steps and ends with one summary line (time, bytes
saved, ratio). Wan2.1 T2V and HunyuanVideo folders load through xfuser's runner models
(`patches.runner_models`) and are written as ``video_<i>.mp4`` (PNG frames + ``.npy`` without PyAV).

In-process use (tests): ``run_pipeline(args) -> RunResult`` with ``args`` from ``parse_args``;
``serve(args, requests) -> [RunResult]``; or ``load_pipeline(args)`` once, then
``call_pipeline(loaded, args, prompt=..., height=...)`` per request.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Any

import torch

from compactfusion_xdit import args as cli_args
from compactfusion_xdit import faults, liveness, modes, outputs, patches, request_list
from compactfusion_xdit.patches import cpu_gloo

#: diffusers pipeline class name (model_index.json ``_class_name``) -> xfuser wrapper class name.
PIPELINES = {
    "FluxPipeline": "xFuserFluxPipeline",
    "PixArtAlphaPipeline": "xFuserPixArtAlphaPipeline",
    "PixArtSigmaPipeline": "xFuserPixArtSigmaPipeline",
    "StableDiffusion3Pipeline": "xFuserStableDiffusion3Pipeline",
}

#: Pipelines with no xfuser wrapper class, loaded by xfuser's runner model of their class
#: (`patches.runner_models`); their output is a video (``out.frames``).
RUNNER_MODEL_PIPELINES = ("WanPipeline", "HunyuanVideoPipeline")

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


class UsageError(ValueError):
    """A setting the user can fix; the message says what to change."""


@dataclasses.dataclass
class RunResult:
    """What one rank produced. ``output`` is the pipeline's output on the rank that writes files
    (latents tensor for ``--output_type latent``, else a list of PIL images); None elsewhere."""

    rank: int
    world_size: int
    is_output_rank: bool
    output: Any
    stats: dict


# --------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    cpu_gloo.make_xfuser_importable()
    return cli_args.build_parser().parse_args(argv)


# --------------------------------------------------------------------------------------------
# Model resolution and checks (before anything is built)
# --------------------------------------------------------------------------------------------


def resolve_model_path(model: str) -> str:
    """A built-in tiny model name -> its materialised folder; otherwise a local diffusers folder."""
    from compactfusion_xdit.models import tiny

    if model in tiny.BUILTIN_MODELS:
        return tiny.materialize(model)
    if not os.path.isdir(model):
        builtin = ", ".join(tiny.BUILTIN_MODELS)
        raise UsageError(f"--model {model!r} is neither a built-in model ({builtin}) nor a local diffusers folder")
    if not os.path.isfile(os.path.join(model, "model_index.json")):
        raise UsageError(f"--model {model!r} has no model_index.json; pass a diffusers folder (save_pretrained output)")
    return model


def pipeline_class_name(model_path: str) -> str:
    with open(os.path.join(model_path, "model_index.json")) as f:
        name = json.load(f).get("_class_name")
    if name not in PIPELINES and name not in RUNNER_MODEL_PIPELINES:
        supported = ", ".join([*PIPELINES, *RUNNER_MODEL_PIPELINES])
        raise UsageError(f"model {model_path!r} is a {name}; supported pipelines: {supported}")
    return name


def _transformer_config(model_path: str) -> dict:
    path = os.path.join(model_path, "transformer", "config.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def parallel_settings(args: argparse.Namespace) -> dict:
    return {
        "data_parallel": int(getattr(args, "data_parallel_degree", 1) or 1),
        "ulysses": int(args.ulysses_degree or 1),
        "ring": int(args.ring_degree or 1),
        "pipefusion": int(args.pipefusion_parallel_degree or 1),
        "cfg": 2 if args.use_cfg_parallel else 1,
        "tensor_parallel": int(getattr(args, "tensor_parallel_degree", 1) or 1),
        "num_pipeline_patch": int(args.num_pipeline_patch or 1),
        "warmup_steps": int(args.warmup_steps),
        **modes_settings(args),
    }


def modes_settings(args: argparse.Namespace) -> dict:
    """The parallel modes' degrees (see `compactfusion_xdit.modes`), for checks and stats.json."""
    layout = modes.layout
    return {"patch": layout.degree(args, "patch"), "patch_mode": getattr(args, "patch_parallel_mode", "displaced"),
            "step": layout.degree(args, "step"), "step_warmup": int(getattr(args, "step_parallel_warmup", 2) or 0)}


def check_settings(args: argparse.Namespace, model_path: str, class_name: str, world_size: int) -> None:
    """Reject combinations xfuser would fail on later (or silently mis-handle), one line each."""
    par = parallel_settings(args)
    product = par["data_parallel"] * par["ulysses"] * par["ring"] * par["pipefusion"] * par["cfg"] * par["tensor_parallel"]
    product *= par["patch"] * par["step"]
    if product != world_size:
        raise UsageError(
            f"the parallel degrees multiply to {product} (data {par['data_parallel']} x ulysses {par['ulysses']} x ring "
            f"{par['ring']} x pipefusion {par['pipefusion']} x cfg {par['cfg']} x patch {par['patch']} x step "
            f"{par['step']}) but {world_size} ranks were launched; "
            f"launch {product} ranks or change the degrees"
        )
    heads = _transformer_config(model_path).get("num_attention_heads")
    if heads is not None and heads % par["ulysses"] != 0:
        raise UsageError(
            f"the model has {heads} attention heads, not divisible by --ulysses_degree {par['ulysses']}; "
            f"use a Ulysses degree that divides {heads} (move the rest to --ring_degree)"
        )
    if par["cfg"] > 1 and class_name == "FluxPipeline":
        raise UsageError("Flux has no classifier-free guidance branch to split; drop --use_cfg_parallel")
    if par["pipefusion"] > 1 and par["num_pipeline_patch"] < par["pipefusion"]:
        raise UsageError(
            f"--num_pipeline_patch {par['num_pipeline_patch']} is smaller than --pipefusion_parallel_degree "
            f"{par['pipefusion']}; use at least one patch per stage"
        )
    try:
        modes.check(args)
    except modes.CompositionError as err:
        raise UsageError(str(err)) from None
    if args.output_type not in ("pil", "latent"):
        raise UsageError(f"--output_type {args.output_type!r} is not supported; use pil or latent")
    if getattr(args, "use_fp8_comms", False) and getattr(args, "compression", "none") != "none":
        raise UsageError("--use_fp8_comms and --compression both change the Ulysses exchange; use one of them")
    problem = cli_args.compile_conflict(args)
    if problem:
        raise UsageError(problem)


def model_dtype(args: argparse.Namespace) -> torch.dtype:
    name = getattr(args, "dtype", None)
    if name:
        return DTYPES[name]
    return torch.bfloat16 if torch.cuda.is_available() else torch.float32


def compression_config(args: argparse.Namespace):
    """The `CompressionConfig` of the ``--compression*`` flags; a bad value is a usage error."""
    try:
        return cli_args.compression_config(args)
    except ValueError as err:
        raise UsageError(str(err)) from None


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
    config = compression_config(args)
    patches.install(config)
    session = patches.session()
    if session is not None:  # an installation reused by a second run in this process counts afresh
        session.state.reset_stats()
        if session.lifecycle is not None:
            session.lifecycle.reset_checks()
    from xfuser import xFuserArgs
    import xfuser
    from xfuser.core.distributed import get_world_group

    model_path = resolve_model_path(args.model)
    class_name = pipeline_class_name(model_path)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    check_settings(args, model_path, class_name, world_size)
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

    if class_name in RUNNER_MODEL_PIPELINES:
        from compactfusion_xdit.patches import runner_models

        settings = {"prompt": input_config.prompt, "height": input_config.height, "width": input_config.width,
                    "num_inference_steps": input_config.num_inference_steps, "seed": input_config.seed,
                    "num_frames": input_config.num_frames}
        pipe = runner_models.load_with_runner_model(model_path, engine_args, settings, dtype)
    else:
        pipeline_cls = getattr(xfuser, PIPELINES[class_name])
        pipe = pipeline_cls.from_pretrained(model_path, engine_config=engine_config, torch_dtype=dtype)
    device = torch.device("cuda", get_world_group().local_rank) if torch.cuda.is_available() else torch.device("cpu")
    pipe = pipe.to(device)
    mode = modes.install(pipe, args, session)  # patch / step parallelism; None when off
    faults.install(pipe, get_world_group().rank)  # CFX_FAULT (reliability tests); nothing when unset
    return Loaded(pipe, input_config, class_name, dtype, config, mode)


def check_ranks_agree(args: argparse.Namespace, config, input_config, dtype: torch.dtype) -> None:
    """Every rank must run the same compression, layout, model, input and versions (collective)."""
    from compactfusion_xdit import consistency

    fields = consistency.run_fields(
        compression=config.to_dict(), parallel=parallel_settings(args), model=args.model, dtype=str(dtype),
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
    try:
        return loaded.pipe(**kwargs)
    except BaseException:
        session = patches.session()
        if session is not None:
            session.abandon_request()  # a failed request leaves no cache or buffer behind
        raise


def run_pipeline(args: argparse.Namespace) -> RunResult:
    """Run one request on this rank (torch.distributed env vars set, or a single process)."""
    return serve(args)[0]


def default_request(args: argparse.Namespace, input_config) -> request_list.Request:
    """The run's own settings as a request (what a launch without a prompt list serves)."""
    return request_list.Request(prompt=input_config.prompt, height=input_config.height, width=input_config.width,
                                num_inference_steps=input_config.num_inference_steps, seed=input_config.seed)


def serve(args: argparse.Namespace, requests: list | None = None) -> list[RunResult]:
    """Load once, then run each request (default: the run's own settings) through the same ranks.

    Per request: the plugin's caches start empty and are dropped when it ends (none outlives its
    request), its traffic is counted alone, and ``stats`` records the rank's resident memory after it.
    """
    from xfuser.core.distributed import get_runtime_state, get_world_group

    loaded = load_pipeline(args)
    world = get_world_group()
    outputs.quiet_progress(loaded.pipe, world.rank)
    if requests is None:
        requests = [default_request(args, loaded.input_config)]
    defaults = dataclasses.asdict(default_request(args, loaded.input_config))
    session = patches.session()
    results = []
    for request in requests:
        request = request.with_defaults(defaults)
        begin_request_state(session)
        start = time.perf_counter()
        out = call_pipeline(loaded, args, seed=request.seed, **request.overrides())
        elapsed = time.perf_counter() - start
        results.append(_request_result(loaded, args, world, request, out, elapsed, session))
    get_runtime_state().destroy_distributed_env()
    return results


def begin_request_state(session, reset_stats: bool = True) -> None:
    """A fresh request for the plugin even where the pipeline does not announce one (diffusers
    loops): caches dropped, step 0; traffic counted afresh unless `reset_stats` is False."""
    if session is None:
        return
    if reset_stats:
        session.state.reset_stats()
    if session.lifecycle is not None:
        session.lifecycle.reset_checks()
        session.lifecycle.begin_request()
    else:
        session.begin_request()


def _request_result(loaded: Loaded, args, world, request, out, elapsed: float, session) -> RunResult:
    from xfuser.core.distributed import get_runtime_state

    is_output_rank = world.rank == world.world_size - 1
    traffic = compression_traffic(session)
    if session is not None:
        session.state.reset()  # no cache entry outlives its request
    if getattr(args, "compression_stats", False) and world.rank == 0:
        print(format_traffic(traffic))
    output = None
    if is_output_rank and out is not None:
        output = out.frames if hasattr(out, "frames") else out.images
    stats = {
        "world_size": world.world_size,
        "elapsed_s": elapsed,
        "model": args.model,
        "pipeline": loaded.class_name,
        "dtype": str(loaded.dtype).replace("torch.", ""),
        "prompt": request.prompt,
        "height": request.height,
        "width": request.width,
        "num_inference_steps": request.num_inference_steps,
        "seed": request.seed,
        "parallel": parallel_settings(args),
        "compression": loaded.config.name,
        "compression_config": loaded.config.to_dict(),
        "attention_backend": get_runtime_state().attention_backend.name,
        "cache_entries_after": session.state.stats()["cache_entries"] if session is not None else 0,
        "rss_bytes": resident_bytes(),
        **traffic,
    }
    return RunResult(world.rank, world.world_size, is_output_rank, output, stats)


def resident_bytes() -> int:
    """This process's resident set size (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def compression_traffic(session) -> dict:
    """Bytes over every rank (collective over the world group when a session exists): ``raw_bytes``
    (what the uncompressed exchanges would send), ``sent_bytes``, ``ratio``, per path
    ``{"raw_bytes", "sent_bytes", "messages"}``, and ``cache_consistent`` (None unless checked).
    Without a session (``--compression none``) nothing is counted: zeros, ratio 1.0."""
    if session is None:
        return {"raw_bytes": 0, "sent_bytes": 0, "ratio": 1.0, "paths": {}, "cache_consistent": None}
    lifecycle = getattr(session, "lifecycle", None)
    if lifecycle is not None and getattr(session.config, "check", False):
        lifecycle.check_caches()  # every message of the request has been received by now
    local = session.stats()
    gathered: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, local)
    paths: dict[str, dict[str, int]] = {}
    for stats in gathered:
        for path, counts in stats["paths"].items():
            total = paths.setdefault(path, {"raw_bytes": 0, "sent_bytes": 0, "messages": 0})
            for k in total:
                total[k] += counts[k]
    raw = sum(p["raw_bytes"] for p in paths.values())
    sent = sum(p["sent_bytes"] for p in paths.values())
    consistent = None
    if lifecycle is not None and lifecycle.cache_consistent is not None:
        consistent = lifecycle.cache_consistent
        if not consistent:
            print("residual caches diverged:\n" + "\n".join(lifecycle.mismatches[:20]), file=sys.stderr)
    return {"raw_bytes": raw, "sent_bytes": sent, "ratio": raw / sent if sent else 1.0, "paths": paths,
            "cache_consistent": consistent}


def format_traffic(traffic: dict) -> str:
    """The per-path byte table ``--compression-stats`` prints."""
    rows = [("path", "messages", "raw bytes", "sent bytes", "ratio")]
    for path, p in sorted(traffic["paths"].items()):
        ratio = p["raw_bytes"] / p["sent_bytes"] if p["sent_bytes"] else 1.0
        rows.append((path, str(p["messages"]), str(p["raw_bytes"]), str(p["sent_bytes"]), f"{ratio:.2f}x"))
    rows.append(("total", str(sum(p["messages"] for p in traffic["paths"].values())), str(traffic["raw_bytes"]),
                 str(traffic["sent_bytes"]), f"{traffic['ratio']:.2f}x"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows)


def write_outputs(result: RunResult, output_dir: str, output_type: str, prefix: str = "",
                  stats_file: str | None = "stats.json") -> list[str]:
    """Write the output rank's files (``<prefix>image_<i>.png`` or ``<prefix>latents.npy``, and
    `stats_file` unless None); returns the paths written."""
    import numpy as np

    os.makedirs(output_dir, exist_ok=True)
    written = []
    if output_type == "latent":
        path = os.path.join(output_dir, f"{prefix}latents.npy")
        np.save(path, result.output.detach().float().cpu().numpy())
        written.append(path)
    elif result.stats["pipeline"] in RUNNER_MODEL_PIPELINES:  # videos: frames per batch item
        for i, video in enumerate(result.output):
            written += outputs.save_video(video, os.path.join(output_dir, f"{prefix}video_{i}"), fps=16)
    else:
        written += outputs.save_images(result.output, os.path.join(output_dir, f"{prefix}image"))
    result.stats["outputs"] = [os.path.basename(p) for p in written]
    if stats_file is None:
        return written
    stats_path = os.path.join(output_dir, stats_file)
    with open(stats_path, "w") as f:
        json.dump(result.stats, f, indent=2)
    return written + [stats_path]


def write_request_outputs(results: list[RunResult], output_dir: str, output_type: str) -> list[str]:
    """One request: as `write_outputs`. Several: ``req<NNNN>_image_<i>.png`` (or ``_latents.npy``)
    per request and one ``stats.json`` with a ``requests`` list and the summed traffic."""
    if len(results) == 1:
        return write_outputs(results[0], output_dir, output_type)
    written = []
    for n, result in enumerate(results):
        written += write_outputs(result, output_dir, output_type, prefix=f"req{n:04d}_", stats_file=None)
    raw, sent = sum(r.stats["raw_bytes"] for r in results), sum(r.stats["sent_bytes"] for r in results)
    summary = {"requests": [r.stats for r in results], "raw_bytes": raw, "sent_bytes": sent,
               "ratio": raw / sent if sent else 1.0, "elapsed_s": sum(r.stats["elapsed_s"] for r in results)}
    stats_path = os.path.join(output_dir, "stats.json")
    with open(stats_path, "w") as f:
        json.dump(summary, f, indent=2)
    return written + [stats_path]


def request_summary(results: list[RunResult]) -> str:
    """The closing line: time, bytes saved, ratio over every request of the launch."""
    raw, sent = sum(r.stats["raw_bytes"] for r in results), sum(r.stats["sent_bytes"] for r in results)
    elapsed = sum(r.stats["elapsed_s"] for r in results)
    return outputs.summary_line(elapsed, len(results), raw, sent, results[0].stats["compression"])


def main(argv: list[str] | None = None) -> int:
    rank = os.environ.get("RANK", "0")
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse_args(argv)
        try:
            requests = request_list.listed_requests(argv, args.prompt_file)
        except request_list.RequestError as err:
            raise UsageError(str(err)) from None
        results = serve(args, requests)
        if results[0].is_output_rank:
            for path in write_request_outputs(results, args.output_dir, args.output_type):
                print(f"wrote {path}")
        if results[0].rank == 0:
            print(request_summary(results), flush=True)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # one line for users; CFX_DEBUG=1 shows the traceback
        if os.environ.get("CFX_DEBUG"):
            raise
        lost = liveness.lost_ranks_note()  # names a dead or frozen peer, if any
        print(f"error (rank {rank}): {lost}{type(err).__name__}: {err}  [set CFX_DEBUG=1 for the traceback]",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    code = main()
    if code:  # a failed rank must not wait in interpreter shutdown for peers that are gone
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
