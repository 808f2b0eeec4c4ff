"""Per-layer cost of a coded Ulysses exchange: the plugin's overhead over the stock collective.

One "layer" is what xfuser's Ulysses attention moves: one all-to-all of q, k and v (three keys in
one collective) and one of the attention output. Each rank holds its sequence shard of
(tokens / ranks) x heads x head_dim per tensor; the exchange runs over gloo on this machine's
loopback (no shaping), `--ranks` processes. For every compression the table gives the median
microseconds per layer at coded steps (after the warm-up step that seeds the caches) and the
overhead over `none` (the stock bytes through the same communicator).

    python scripts/bench_exchange.py                        # 2 ranks, tiny-flux-sized tensors
    python scripts/bench_exchange.py --ranks 4 --tokens 4096 --heads 24 --head-dim 128 --dtype bfloat16

Writes --out (JSON). Timing is wall time on CPU; run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

HERE = os.path.abspath(__file__)


def exchange_loop(rank: int, world: int, compression: str, tokens: int, heads: int, head_dim: int, dtype: str,
                  layers: int, steps: int) -> dict:
    """Rank target: `steps` steps of `layers` layers; returns per-layer seconds of the coded steps."""
    import torch
    import torch.distributed as dist

    from compactfusion_xdit.comm import CompressedCommunicator
    from compactfusion_xdit.core.residual import ResidualState

    torch.set_num_threads(1)
    dt = getattr(torch, dtype)
    state = ResidualState(compression)
    comm = CompressedCommunicator(state)
    rows = tokens // world * heads // world  # per destination chunk: my tokens x the peer's heads
    g = torch.Generator().manual_seed(rank)
    base = [torch.randn(world * rows, head_dim, generator=g) for _ in range(4)]
    drift = [torch.randn(world * rows, head_dim, generator=g) for _ in range(4)]
    state.begin_request()
    per_layer = []
    for step in range(steps):
        state.set_step(step)
        xs = [(b + 0.05 * step * d).to(dt) for b, d in zip(base, drift)]
        dist.barrier()
        start = time.perf_counter()
        for layer in range(layers):
            comm.all_to_all_many([("ulysses", layer, r) for r in "qkv"], xs[:3])
            comm.all_to_all(("ulysses", layer, "out"), xs[3])
        elapsed = time.perf_counter() - start
        if step >= 1:  # step 0 seeds the caches (warm-up): raw
            per_layer.append(elapsed / layers)
    comm.check_caches()
    return {"per_layer_s": per_layer}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--tokens", type=int, default=64, help="sequence length of the whole attention (tiny-flux 64x64: ~48)")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=16)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--compressions", default="none,residual-int4,residual-1bit")
    p.add_argument("--layers", type=int, default=20)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--out", default="bench_exchange.json")
    args = p.parse_args(argv)
    if args.tokens % args.ranks or args.heads % args.ranks:
        p.error(f"--tokens ({args.tokens}) and --heads ({args.heads}) must divide by --ranks ({args.ranks})")
    from compactfusion_xdit.testing import run_ranks

    rows = []
    for name in args.compressions.split(","):
        results = run_ranks(f"{HERE}:exchange_loop", args.ranks,
                            dict(compression=name, tokens=args.tokens, heads=args.heads, head_dim=args.head_dim,
                                 dtype=args.dtype, layers=args.layers, steps=args.steps), timeout=600)
        # a layer ends when the slowest rank is done: take the max over ranks per step
        per_step = [max(r["per_layer_s"][i] for r in results) for i in range(len(results[0]["per_layer_s"]))]
        rows.append({"compression": name, "us_per_layer": 1e6 * statistics.median(per_step),
                     "us_per_layer_min": 1e6 * min(per_step)})
    stock = next((r["us_per_layer"] for r in rows if r["compression"] == "none"), None)
    print(f"ranks {args.ranks}, tokens {args.tokens}, heads {args.heads}, head_dim {args.head_dim}, {args.dtype}")
    print(f"{'compression':<18}{'us/layer':>10}{'min':>10}{'overhead us':>13}")
    for r in rows:
        r["overhead_us"] = None if stock is None else r["us_per_layer"] - stock
        over = "" if r["overhead_us"] is None else f"{r['overhead_us']:.0f}"
        print(f"{r['compression']:<18}{r['us_per_layer']:>10.0f}{r['us_per_layer_min']:>10.0f}{over:>13}")
    with open(args.out, "w") as f:
        json.dump({"args": vars(args), "rows": rows, "cpu_count": os.cpu_count()}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
