"""Fidelity and bytes of every codec on the Ulysses path: one model load, one request per codec.

    python scripts/ulysses_codec_table.py --model tiny-flux --ranks 2 --steps 8 --size 64x64

Runs on CPU ranks (gloo) through ``compactfusion_xdit.testing.run_ranks``. Each rank loads the
pipeline once (``--ulysses_degree <ranks>``), runs the uncompressed request, then one request per
compression name (the patches are reinstalled between them). Prints, per name, the PSNR of the final
latents against the uncompressed Ulysses run (peak = the reference's max - min), the largest
absolute difference, and the Ulysses bytes summed over ranks (raw, sent, ratio).
"""

from __future__ import annotations

import argparse
import os
import sys

NAMES = ["residual-int8", "int8", "residual-int4", "int4", "residual-int2", "int2", "residual-1bit", "1bit"]


def rank_main(rank: int, world_size: int, argv: list[str], names: list[str]) -> list:
    """Rank target: the uncompressed request, then one per name: (name, latents or None, stats)."""
    from compactfusion_xdit import patches, worker
    from compactfusion_xdit.config import CompressionConfig

    args = worker.parse_args(argv)
    loaded = worker.load_pipeline(args)
    results = []
    for name in ["none", *names]:
        patches.install(CompressionConfig.parse(name, warmup=args.compression_warmup))
        out = worker.call_pipeline(loaded, args)
        session = patches.session()
        stats = session.stats()["paths"].get("ulysses", {}) if session is not None else {}
        results.append((name, out.images.float() if out is not None and rank == world_size - 1 else None, stats))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-flux", help="built-in tiny model name or a local diffusers folder")
    parser.add_argument("--ranks", type=int, default=2, help="Ulysses degree (= ranks)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--size", default="64x64", help="HEIGHTxWIDTH")
    parser.add_argument("--warmup", type=int, default=1, help="raw steps per request (--compression-warmup)")
    parser.add_argument("--names", default=",".join(NAMES), help="comma list of compression names")
    parser.add_argument("--timeout", type=float, default=600)
    opts = parser.parse_args(argv)
    height, width = (int(v) for v in opts.size.lower().split("x"))
    names = [n for n in opts.names.split(",") if n]

    from compactfusion_xdit.benchmarks.metrics import range_psnr as psnr
    from compactfusion_xdit.testing import run_ranks

    worker_argv = ["--model", opts.model, "--height", str(height), "--width", str(width),
                   "--num_inference_steps", str(opts.steps), "--prompt", "a cat", "--max_sequence_length", "16",
                   "--seed", "42", "--output_type", "latent", "--ulysses_degree", str(opts.ranks),
                   "--compression-warmup", str(opts.warmup)]
    if "pixart" in opts.model.lower():
        worker_argv.append("--no_use_resolution_binning")
    per_rank = run_ranks(f"{os.path.abspath(__file__)}:rank_main", opts.ranks, {"argv": worker_argv, "names": names},
                         timeout=opts.timeout, init_process_group=False)
    ref = per_rank[-1][0][1]
    print(f"model {opts.model}, Ulysses {opts.ranks}, {height}x{width}, {opts.steps} steps, warmup {opts.warmup}; "
          f"PSNR of latents vs uncompressed Ulysses (peak = max - min of the reference)")
    print(f"{'compression':16} {'PSNR dB':>8} {'max|diff|':>10} {'raw bytes':>11} {'sent bytes':>11} {'ratio':>7}")
    for i, name in enumerate(names, start=1):
        latents = per_rank[-1][i][1]
        raw = sum(r[i][2].get("raw_bytes", 0) for r in per_rank)
        sent = sum(r[i][2].get("sent_bytes", 0) for r in per_rank)
        diff = (latents - ref).abs().max().item()
        print(f"{name:16} {psnr(ref, latents):8.2f} {diff:10.2e} {raw:11d} {sent:11d} {raw / sent if sent else 1.0:6.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
