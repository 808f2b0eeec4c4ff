"""Codec cost and wire ratio: encode/decode time, effective GB/s, bytes vs raw.

    python scripts/bench_codec.py                       # CPU, every codec, N in 1024,4096,16384, C=3072
    python scripts/bench_codec.py --device cuda --path both --dtype float16,bfloat16 --json out/codec.json
    python scripts/bench_codec.py --quick               # tiny sizes, one repetition (CI smoke run)

Modes: `residual` (encode_residual with error feedback: read x, read base, write base, write
payload; decode_residual: read payload, read base, write base) and `plain` (encode: read x, write
payload; decode: read payload, write x). Effective GB/s divides those fewest bytes by the median
time. On CUDA, times come from CUDA events (median of --reps after warm-up) and the table carries
the device's copy bandwidth (x.clone(): read + write) as the roofline. `--path fused|torch|both`
selects the fused Triton kernels or the torch reference (CFX_FORCE_TORCH) where a codec has both.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from compactfusion_xdit import codecs  # noqa: E402

DEFAULT_CODECS = ["none", "int8", "int4", "int2", "1bit", "lowrank-8"]
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class force_torch:
    """Context: route codecs to the torch path (or not) for the duration."""

    def __init__(self, on: bool):
        self.on = on

    def __enter__(self):
        self.saved = os.environ.get("CFX_FORCE_TORCH")
        if self.on:
            os.environ["CFX_FORCE_TORCH"] = "1"
        else:
            os.environ.pop("CFX_FORCE_TORCH", None)

    def __exit__(self, *exc):
        if self.saved is None:
            os.environ.pop("CFX_FORCE_TORCH", None)
        else:
            os.environ["CFX_FORCE_TORCH"] = self.saved


def time_call(fn, device: torch.device, reps: int, warmup: int) -> float:
    """Median seconds of fn() over reps runs."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(device: torch.device, reps: int) -> float | None:
    if device.type != "cuda":
        return None
    x = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
    t = time_call(lambda: x.clone(), device, reps, 3)
    return 2 * x.numel() / t / 1e9


def bench_one(name, mode, n, c, dtype, device, reps, warmup):
    codec = codecs.get(name)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(n, c, generator=g, device=device).to(dtype)
    base = (x.float() + 0.1 * torch.randn(n, c, generator=g, device=device)).to(dtype)
    raw = x.numel() * x.element_size()
    payload_bytes = codec.payload_nbytes((n, c), dtype)
    if mode == "residual":
        work = base.clone()
        p = codec.encode_residual(x, work)
        t_enc = time_call(lambda: codec.encode_residual(x, work.copy_(base)), device, reps, warmup)
        t_copy = time_call(lambda: work.copy_(base), device, reps, warmup)
        t_enc = max(t_enc - t_copy, 1e-9)  # the copy only restores the cache between runs
        t_dec = time_call(lambda: codec.decode_residual(p, work), device, reps, warmup)
        enc_bytes, dec_bytes = 3 * raw + payload_bytes, 2 * raw + payload_bytes
    else:
        p = codec.encode(x)
        t_enc = time_call(lambda: codec.encode(x), device, reps, warmup)
        t_dec = time_call(lambda: codec.decode(p), device, reps, warmup)
        enc_bytes = dec_bytes = raw + payload_bytes
    return {
        "codec": name, "mode": mode, "N": n, "C": c, "dtype": str(dtype).replace("torch.", ""),
        "encode_us": t_enc * 1e6, "decode_us": t_dec * 1e6,
        "encode_GBps": enc_bytes / t_enc / 1e9, "decode_GBps": dec_bytes / t_dec / 1e9,
        "payload_bytes": payload_bytes, "raw_bytes": raw,
        "ratio_vs_fp16": (n * c * 2) / payload_bytes, "ratio_vs_dtype": raw / payload_bytes,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--codecs", default=",".join(DEFAULT_CODECS))
    ap.add_argument("--modes", default="residual,plain")
    ap.add_argument("--sizes", default="1024,4096,16384", help="token counts N")
    ap.add_argument("--channels", type=int, default=3072)
    ap.add_argument("--dtype", default="float16", help="comma list of float16,bfloat16,float32")
    ap.add_argument("--path", choices=["torch", "fused", "both"], default="fused",
                    help="fused = the default dispatch (fused kernels where available)")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="tiny sizes and few reps (smoke test)")
    ap.add_argument("--json", default=None, help="write results here")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is available; use --device cpu", file=sys.stderr)
        return 2
    names = [s for s in args.codecs.split(",") if s]
    for name in names:
        codecs.get(name)  # fail fast on a bad name
    sizes = [64] if args.quick else [int(s) for s in args.sizes.split(",")]
    channels = 96 if args.quick else args.channels
    reps = args.reps or (2 if args.quick else (50 if device.type == "cuda" else 5))
    warmup = 1 if args.quick else (10 if device.type == "cuda" else 1)
    paths = {"torch": [True], "fused": [False], "both": [True, False]}[args.path]
    dtypes = [DTYPES[d] for d in args.dtype.split(",")]

    rows = []
    for force in paths:
        with force_torch(force):
            for name in names:
                for mode in args.modes.split(","):
                    if name == "none" and mode == "residual":
                        continue
                    for dtype in dtypes:
                        for n in sizes:
                            row = bench_one(name, mode, n, channels, dtype, device, reps, warmup)
                            row["path"] = "torch" if force else "default"
                            rows.append(row)
    bw = copy_bandwidth(device, reps)
    header = f"{'codec':>10} {'mode':>8} {'path':>7} {'dtype':>8} {'N':>6} {'C':>5} {'enc us':>9} {'enc GB/s':>9} {'dec us':>9} {'dec GB/s':>9} {'x fp16':>7} {'x dtype':>7}" + (" enc %copy dec %copy" if bw else "")
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}"
          + (f"   copy bandwidth {bw:.0f} GB/s" if bw else ""))
    print(header)
    for r in rows:
        print(f"{r['codec']:>10} {r['mode']:>8} {r['path']:>7} {r['dtype']:>8} {r['N']:>6} {r['C']:>5} "
              f"{r['encode_us']:>9.1f} {r['encode_GBps']:>9.2f} {r['decode_us']:>9.1f} {r['decode_GBps']:>9.2f} "
              f"{r['ratio_vs_fp16']:>7.2f} {r['ratio_vs_dtype']:>7.2f}"
              + (f" {100 * r['encode_GBps'] / bw:>9.1f} {100 * r['decode_GBps'] / bw:>9.1f}" if bw else ""))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"device": str(device), "copy_GBps": bw, "torch": torch.__version__, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
