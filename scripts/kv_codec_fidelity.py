"""What codec error does to a model: every attention K/V replaced by its codec reconstruction.

    python scripts/kv_codec_fidelity.py --json out/kv_codec_fidelity.json          # digits-flux, 20 steps
    python scripts/kv_codec_fidelity.py --model tiny-flux --size 64 --prompts "a cat"

One process, no ranks: the pipeline runs as stock diffusers, and each attention layer's K and V pass
through a residual channel (`compactfusion_xdit.core.residual.ResidualState`, keyed per layer and k|v)
exactly as they would cross a link: sender encode, receiver decode, the receiver's tensor used.
That is the worst case of every compressed path (all K/V of all tokens coded, every step after the
warm-up). Reports, per compression name, the PSNR of the final latents against the uncompressed run
(same prompt and seed; peak = the reference's max - min), per prompt and averaged. For digits-flux
the latents are the image pixels (its VAE is exact), so this is also the image PSNR.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

import torch

NAMES = ["int8", "residual-int8", "int4", "residual-int4", "int2", "residual-int2", "1bit", "residual-1bit"]
DIGIT_PROMPTS = [f"digit {d}" for d in range(10)]


class CodedKV:
    """Wraps one attention processor: the K and V its attention call sees are the receiver's view
    of a residual channel (sender encode -> wire -> receiver decode) for keys (path, layer, k|v)."""

    def __init__(self, original, layer: int, state) -> None:
        self.original, self.layer, self.state = original, layer, state
        self.module = sys.modules[type(original).__module__]
        self.dispatch = self.module.dispatch_attention_fn

    def channel(self, role: str, x: torch.Tensor) -> torch.Tensor:
        from compactfusion_xdit.core.residual import MessageKind

        key = ("ulysses", self.layer, role)
        kind = self.state.message_kind(key, tuple(x.shape), x.dtype, key, "send")
        if kind is MessageKind.RAW:
            return x
        if kind is MessageKind.SEED:
            self.state.seed_sender(key, x)
            self.state.seed_receiver(key, x)
            return x
        return self.state.decode(key, self.state.encode(key, x), tuple(x.shape), x.dtype)

    def coded_dispatch(self, query, key, value, *args, **kwargs):
        return self.dispatch(query, self.channel("k", key), self.channel("v", value), *args, **kwargs)

    def __call__(self, *args, **kwargs):
        # the processor looks dispatch_attention_fn up in its module at call time
        self.module.dispatch_attention_fn = self.coded_dispatch
        try:
            return self.original(*args, **kwargs)
        finally:
            self.module.dispatch_attention_fn = self.dispatch


@contextlib.contextmanager
def coded_attention(pipe, state):
    """Inside: every attention of `pipe.transformer` uses coded K/V; steps counted per transformer call."""
    model = pipe.transformer
    originals = dict(model.attn_processors)
    model.set_attn_processor({name: CodedKV(p, i, state) for i, (name, p) in enumerate(originals.items())})
    calls = [0]

    def count_step(module, args):
        state.set_step(calls[0])
        calls[0] += 1

    hook = model.register_forward_pre_hook(count_step)
    state.begin_request()
    try:
        yield
    finally:
        hook.remove()
        model.set_attn_processor(originals)


def load(model: str, threads: int):
    from compactfusion_xdit.models import tiny

    torch.set_num_threads(threads)
    pipe = tiny.build_pipeline(model) if model in tiny.BUILTIN_MODELS else _from_folder(model)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _from_folder(path: str):
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(path, torch_dtype=torch.float32)


def sample(pipe, prompt: str, seed: int, args) -> torch.Tensor:
    out = pipe(prompt, height=args.size, width=args.size, num_inference_steps=args.steps,
               max_sequence_length=args.max_sequence_length, output_type="latent",
               generator=torch.Generator().manual_seed(seed))
    return out.images.float()


def measure(args: argparse.Namespace) -> dict:
    from compactfusion_xdit.benchmarks.metrics import range_psnr as psnr
    from compactfusion_xdit.core.config import CompressionConfig
    from compactfusion_xdit.core.residual import ResidualState

    start = time.perf_counter()
    pipe = load(args.model, args.threads)
    seeds = [args.seed + i for i in range(len(args.prompts))]
    clean = [sample(pipe, p, s, args) for p, s in zip(args.prompts, seeds)]
    results = {}
    for name in args.names:
        state = ResidualState(CompressionConfig.parse(name, warmup=args.warmup))
        per_prompt = []
        for prompt, seed, ref in zip(args.prompts, seeds, clean):
            with coded_attention(pipe, state):
                per_prompt.append(psnr(ref, sample(pipe, prompt, seed, args)))
        results[name] = {"psnr_db_mean": sum(per_prompt) / len(per_prompt), "psnr_db_min": min(per_prompt),
                         "psnr_db_per_prompt": per_prompt}
        print(f"{name:>20}  {results[name]['psnr_db_mean']:7.2f} dB (min {results[name]['psnr_db_min']:.2f})", flush=True)
    return {
        "command": "python scripts/kv_codec_fidelity.py " + " ".join(sys.argv[1:]),
        "model": args.model, "size": args.size, "steps": args.steps, "warmup": args.warmup,
        "max_sequence_length": args.max_sequence_length, "prompts": args.prompts, "seeds": seeds,
        "what": "every attention K and V replaced by its codec reconstruction (one process); PSNR of the final "
                "latents vs the uncompressed run, peak = reference max - min",
        "results": results, "elapsed_s": time.perf_counter() - start,
    }


def markdown(report: dict) -> str:
    rows = ["| compression | PSNR mean (dB) | PSNR min (dB) |", "|---|---:|---:|"]
    for name, r in report["results"].items():
        rows.append(f"| {name} | {r['psnr_db_mean']:.1f} | {r['psnr_db_min']:.1f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="digits-flux", help="a built-in name or a local diffusers folder")
    p.add_argument("--size", type=int, default=16, help="image side in pixels (digits-flux: 16)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=1, help="raw steps at the start of each request")
    p.add_argument("--max-sequence-length", type=int, default=16)
    p.add_argument("--prompts", nargs="+", default=DIGIT_PROMPTS)
    p.add_argument("--seed", type=int, default=0, help="prompt i uses seed + i")
    p.add_argument("--names", nargs="+", default=NAMES, help="compression names (CompressionConfig.parse)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="write the report here")
    args = p.parse_args(argv)
    report = measure(args)
    print(markdown(report))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
