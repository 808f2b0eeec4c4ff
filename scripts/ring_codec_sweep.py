"""Fidelity and traffic of the compressed ring, per codec, on CPU ranks (gloo, real xfuser).

    OMP_NUM_THREADS=1 python scripts/ring_codec_sweep.py --ring 2 --steps 8 --size 64x64

Runs tiny-flux once per compression name with only the ring path compressed (the first run is
stock ``--compression none``), all runs in one launch, and prints per name the latents' PSNR
against stock (10 log10(range^2 / MSE), range of the stock latents) and the ring path's
raw/sent bytes summed over the ranks.
"""

from __future__ import annotations

import argparse
import math
import os

DEFAULT_NAMES = ["residual-int8", "residual-int4", "residual-int2", "residual-1bit", "int4"]


def worker_runs(rank: int, world_size: int, runs: list[list[str]], ports: list[int]):
    """Rank target: the worker runs in turn, each on its own master port."""
    from compactfusion_xdit import worker

    outs = []
    for argv, port in zip(runs, ports):
        os.environ["MASTER_PORT"] = str(port)
        result = worker.run_pipeline(worker.parse_args(argv))
        outs.append((result.output.float() if result.is_output_rank else None, result.stats))
    return outs


def main() -> None:
    from compactfusion_xdit.testing import free_port, run_ranks

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ring", type=int, default=2, help="ring degree (= ranks)")
    parser.add_argument("--ulysses", type=int, default=1, help="Ulysses degree (ranks = ring x ulysses)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--size", default="64x64", help="HEIGHTxWIDTH")
    parser.add_argument("--model", default="tiny-flux")
    parser.add_argument("--names", default=",".join(DEFAULT_NAMES), help="comma list of compression names")
    parser.add_argument("--timeout", type=float, default=600.0)
    opts = parser.parse_args()
    height, width = (int(v) for v in opts.size.lower().split("x"))
    names = ["none"] + [n for n in opts.names.split(",") if n]
    layout = ["--ring_degree", str(opts.ring), "--ulysses_degree", str(opts.ulysses)]
    argvs = []
    for name in names:
        argvs.append(["--model", opts.model, "--height", str(height), "--width", str(width),
                      "--num_inference_steps", str(opts.steps), "--prompt", "a cat", "--max_sequence_length", "16",
                      "--seed", "42", "--output_type", "latent", *layout, "--compression", name,
                      *([] if name == "none" else ["--compression-paths", "ring", "--compression-check"])])
    here = os.path.abspath(__file__)
    outs = run_ranks(f"{here}:worker_runs", opts.ring * opts.ulysses, {"runs": argvs, "ports": [free_port() for _ in names]},
                     timeout=opts.timeout, init_process_group=False)[-1]
    stock = outs[0][0]
    span = float(stock.max() - stock.min())
    print(f"{opts.model} {height}x{width}, {opts.steps} steps, ring {opts.ring} x ulysses {opts.ulysses}; "
          f"PSNR vs stock over range {span:.3f}")
    print(f"{'compression':<16}{'PSNR dB':>9}{'max|diff|':>11}{'raw bytes':>12}{'sent bytes':>12}{'ratio':>8}  caches")
    for name, (latents, stats) in zip(names, outs):
        mse = float(((latents - stock) ** 2).mean())
        value = math.inf if mse == 0 else 10 * math.log10(span * span / mse)
        ring = stats.get("paths", {}).get("ring", {"raw_bytes": 0, "sent_bytes": 0})
        ratio = ring["raw_bytes"] / ring["sent_bytes"] if ring["sent_bytes"] else float("nan")
        print(f"{name:<16}{value:>9.1f}{float((latents - stock).abs().max()):>11.2e}{ring['raw_bytes']:>12}"
              f"{ring['sent_bytes']:>12}{ratio:>7.2f}x  {stats.get('cache_consistent')}")


if __name__ == "__main__":
    main()
