"""Per-layer cost of a coded Ulysses exchange: the plugin's overhead over the stock collective.

One "layer" is what xfuser's Ulysses attention moves: one all-to-all of q, k and v (three keys in
one collective) and one of the attention output. Each rank holds its sequence shard of
(tokens / ranks) x heads x head_dim per tensor; the exchange runs over gloo on this machine's
loopback (no shaping), `--ranks` processes. For every compression the table gives, per layer at
coded steps (after the warm-up step that seeds the caches), the median main-thread CPU time of a
rank (`time.thread_time`: the plugin's Python, codec kernels and tensor copies; waiting for the
collective and gloo's own I/O threads excluded) and the wall time, and each one's overhead over
`none` (the stock bytes through the same communicator). The CPU figure is the plugin's cost; the
wall figure adds the transport, which on a small shared VM varies by 2x from run to run.

    python scripts/bench_exchange.py                        # 2 ranks, tiny-flux-sized tensors
    python scripts/bench_exchange.py --loopback             # one process, no transport: the plugin alone
    python scripts/bench_exchange.py --ranks 4 --tokens 4096 --heads 24 --head-dim 128 --dtype bfloat16

`--loopback` runs one process against `testing.loopback` (every peer mirrors this rank; the
collective is a local copy): no transport and no peer in the way, so the figure is the plugin's
own cost per layer, `--repeats` times interleaved across compressions (the table keeps the best
median). Writes --out (JSON). Run it on a quiet machine.
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
                  layers: int, steps: int, exchange: str = "ulysses") -> dict:
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
    per_layer, cpu_per_layer = [], []
    for step in range(steps):
        state.set_step(step)
        xs = [(b + 0.05 * step * d).to(dt) for b, d in zip(base, drift)]
        dist.barrier()
        start, cpu = time.perf_counter(), time.thread_time()
        for layer in range(layers):
            layer_exchange(comm, exchange, layer, xs)
        elapsed, cpu = time.perf_counter() - start, time.thread_time() - cpu
        if step >= 2:  # step 0 seeds the caches (warm-up): raw; step 1 loads the kernels and plans
            per_layer.append(elapsed / layers)
            cpu_per_layer.append(cpu / layers)
    comm.check_caches()
    return {"per_layer_s": per_layer, "cpu_per_layer_s": cpu_per_layer}


def layer_exchange(comm, exchange: str, layer: int, xs: list, group=None) -> None:
    """One layer's traffic of `exchange` (see the module docstring) through `comm`."""
    if exchange == "ulysses":
        comm.all_to_all_many([("ulysses", layer, r) for r in "qkv"], xs[:3], group=group)
        comm.all_to_all(("ulysses", layer, "out"), xs[3], group=group)
    elif exchange == "ring":
        for _ in comm.ring_exchange(("ring", layer), (xs[1], xs[2]), group=group):
            pass
    elif exchange == "all-gather":
        comm.all_gather(("patch", layer, "k"), xs[1], group=group)
        comm.all_gather(("patch", layer, "v"), xs[2], group=group)
    elif exchange == "p2p":  # one PipeFusion hop: send to the next rank, receive from the previous
        import torch.distributed as dist

        me, world = dist.get_rank(group), dist.get_world_size(group)
        sent = comm.isend(("pipefusion", layer), xs[0], dst=(me + 1) % world, group=group)
        comm.irecv(("pipefusion", layer), xs[0].shape, xs[0].dtype, src=(me - 1) % world, group=group).wait()
        sent.wait()
    else:
        raise ValueError(f"unknown exchange {exchange!r}")


def loopback_layers(world: int, compression: str, tokens: int, heads: int, head_dim: int, dtype: str, layers: int,
                    steps: int, exchange: str = "ulysses") -> float:
    """Median CPU seconds per layer of the exchange loop in one process over `testing.loopback`
    (no transport: every second is the caller's thread at work)."""
    import torch

    from compactfusion_xdit.comm import CompressedCommunicator
    from compactfusion_xdit.core.residual import ResidualState
    from compactfusion_xdit.testing.loopback import loopback

    torch.set_num_threads(1)
    dt = getattr(torch, dtype)
    state = ResidualState(compression)
    comm = CompressedCommunicator(state)
    rows = tokens // world * heads // world
    g = torch.Generator().manual_seed(0)
    base = [torch.randn(world * rows, head_dim, generator=g) for _ in range(4)]
    drift = [torch.randn(world * rows, head_dim, generator=g) for _ in range(4)]
    per_layer = []
    with loopback(world, 0) as counts:
        state.begin_request()
        for step in range(steps):
            state.set_step(step)
            xs = [(b + 0.05 * step * d).to(dt) for b, d in zip(base, drift)]
            start = time.thread_time()  # CPU time of this thread: the same on a busy machine
            for layer in range(layers):
                layer_exchange(comm, exchange, layer, xs, counts.group)
            if step >= 2:
                per_layer.append((time.thread_time() - start) / layers)
    return statistics.median(per_layer)


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
    p.add_argument("--exchange", default="ulysses", choices=["ulysses", "ring", "all-gather", "p2p"],
                   help="what one layer moves (default: Ulysses' two all-to-alls)")
    p.add_argument("--loopback", action="store_true", help="one process, no transport: the plugin's own cost")
    p.add_argument("--repeats", type=int, default=5, help="--loopback: interleaved repeats (best median kept)")
    p.add_argument("--out", default="bench_exchange.json")
    args = p.parse_args(argv)
    if args.tokens % args.ranks or args.heads % args.ranks:
        p.error(f"--tokens ({args.tokens}) and --heads ({args.heads}) must divide by --ranks ({args.ranks})")
    kernels = _compiled_kernels()
    if args.loopback:
        return _loopback_table(args, kernels)
    from compactfusion_xdit.testing import run_ranks

    rows = []
    for name in args.compressions.split(","):
        results = run_ranks(f"{HERE}:exchange_loop", args.ranks,
                            dict(compression=name, tokens=args.tokens, heads=args.heads, head_dim=args.head_dim,
                                 dtype=args.dtype, layers=args.layers, steps=args.steps, exchange=args.exchange),
                            timeout=600)
        # a layer ends when the slowest rank is done: take the max over ranks per step
        steps = range(len(results[0]["per_layer_s"]))
        wall = [max(r["per_layer_s"][i] for r in results) for i in steps]
        cpu = [max(r["cpu_per_layer_s"][i] for r in results) for i in steps]
        rows.append({"compression": name, "cpu_us_per_layer": 1e6 * statistics.median(cpu),
                     "wall_us_per_layer": 1e6 * statistics.median(wall)})
    stock = next((r for r in rows if r["compression"] == "none"), None)
    print(f"{args.exchange}, ranks {args.ranks}, tokens {args.tokens}, heads {args.heads}, head_dim {args.head_dim}, {args.dtype}; "
          f"median over {args.steps - 2} steps of {args.layers} layers")
    print(f"{'compression':<18}{'cpu us/layer':>14}{'overhead':>10}{'wall us/layer':>15}{'overhead':>10}")
    for r in rows:
        for what in ("cpu", "wall"):
            r[f"{what}_overhead_us"] = None if stock is None else r[f"{what}_us_per_layer"] - stock[f"{what}_us_per_layer"]
        over = lambda v: "" if v is None else f"{v:.0f}"  # noqa: E731
        print(f"{r['compression']:<18}{r['cpu_us_per_layer']:>14.0f}{over(r['cpu_overhead_us']):>10}"
              f"{r['wall_us_per_layer']:>15.0f}{over(r['wall_overhead_us']):>10}")
    with open(args.out, "w") as f:
        json.dump({"args": vars(args), "rows": rows, "cpu_count": os.cpu_count(), "cpu_kernels": kernels}, f, indent=1)
    return 0


def _compiled_kernels() -> str:
    """Wait for the compiled CPU codecs (a first compile takes about a minute), so that no process
    measures the torch path by accident; their status, for the JSON."""
    from compactfusion_xdit.codecs import cpu

    if cpu.enabled() and not cpu.ensure_compiled(timeout=900):
        print("warning: the compiled CPU codecs are unavailable; the torch reference codes", file=sys.stderr)
    return cpu.status()


def _loopback_table(args, kernels: str) -> int:
    names = args.compressions.split(",")
    best = {n: float("inf") for n in names}
    for _ in range(args.repeats):
        for n in names:
            best[n] = min(best[n], loopback_layers(args.ranks, n, args.tokens, args.heads, args.head_dim, args.dtype,
                                                   args.layers, args.steps, args.exchange))
    stock = best.get("none")
    print(f"{args.exchange}, loopback, {args.ranks} ranks (this is rank 0), tokens {args.tokens}, heads {args.heads}, "
          f"head_dim {args.head_dim}, {args.dtype}; best of {args.repeats} medians")
    print(f"{'compression':<18}{'us/layer':>10}{'overhead':>10}")
    rows = []
    for n in names:
        over = None if stock is None else 1e6 * (best[n] - stock)
        rows.append({"compression": n, "us_per_layer": 1e6 * best[n], "overhead_us": over})
        print(f"{n:<18}{1e6 * best[n]:>10.0f}{'' if over is None else f'{over:.0f}':>10}")
    with open(args.out, "w") as f:
        json.dump({"args": vars(args), "rows": rows, "cpu_count": os.cpu_count(), "cpu_kernels": kernels}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
