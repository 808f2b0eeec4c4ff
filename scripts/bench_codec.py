"""Codec cost and wire ratio: encode/decode time, effective GB/s, bytes vs raw (CPU or CUDA).

    python scripts/bench_codec.py                       # CPU, every codec, N in 1024,4096,16384, C=3072
    python scripts/bench_codec.py --device cuda --path both --dtype float16,bfloat16 --json out/codec.json
    python scripts/bench_codec.py --device cuda --codecs int8,int4,int2,1bit --modes residual --sweep-warps
    python scripts/bench_codec.py --quick               # tiny sizes, one repetition (CI smoke run)
    python scripts/bench_codec.py --codecs int4 --modes residual --path both --dtype float32,bfloat16 --sizes 64,256 --channels 64
    python scripts/bench_codec.py --block --codecs int4,1bit --dtype float32,bfloat16   # CPU block API

`--block` (CPU) times instead `codecs.cpu.encode_block` / `decode_block` (residual, error
feedback) on --links links (default 2) with no link skipped and with link 0 skipped (an
all-to-all's own chunk, copied by decode_block from src3), wrapper included, at --block-sizes
(default 64x64,256x64,4096x3072): median and 10th-percentile us, and GB/s (per coded link:
encode reads x and base and writes base and the message; decode reads the message and base and
writes base and out). Next to it the torch reference doing the same links one by one
(encode_residual / decode_residual with CFX_FORCE_TORCH=1; its copies into a wire not counted).

Modes: `residual` (encode_residual with error feedback: read x, read base, write base, write
payload; decode_residual: read payload, read base, write base) and `plain` (encode: read x, write
payload; decode: read payload, write x). Effective GB/s divides those fewest bytes by the median
time. `--path fused|torch|both` selects the default dispatch (the fused kernels where a codec has
them: Triton on CUDA, the numba-compiled codecs on CPU) or the torch reference (CFX_FORCE_TORCH=1);
the `backend` column names what took the call (fused, cpu or torch). On CPU the script first waits
for the compiled kernels (`codecs.cpu.ensure_compiled`) and prints how long that took (a first
compile on the machine, or a load from numba's cache), and runs torch on --threads threads (1).

Timing: on CPU, ``time.perf_counter`` (median of --reps after warm-up). On CUDA with Triton,
``triton.testing.do_bench`` (CUDA events, L2 cache flushed before each run, median); without
Triton, CUDA events. On CUDA the table also carries the device's copy bandwidth (read + write of a
256 MiB copy) as the roofline, and for N <= --graph-max-n the fused residual kernels are timed a
second time as a CUDA-graph replay of the whole call (launch overhead out; ``*_graph_us``).
``--sweep-warps`` (CUDA, Triton) times residual int4 at each num_warps (launch tuning aid).

JSON (--json): ``device``, ``torch``, ``triton``, ``timer``, ``copy_GBps``, ``rows`` (one per
codec x mode x path x dtype x N: times in us, GB/s, ``payload_bytes``, ``raw_bytes``,
``ratio_vs_fp16``, ``ratio_vs_dtype``, ``backend``), ``num_warps_sweep`` and on CPU
``cpu_compile_s`` (seconds until the compiled CPU codecs were ready) and ``threads``. Earlier files stay readable:
docs/results/bench_codec_h100.json has this layout; docs/results/bench_fused_h100.json is the
former fused-only benchmark's (``fused_enc_us``, ``torch_enc_us`` ... per row).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

from compactfusion_xdit import codecs
from compactfusion_xdit.codecs import base as codec_base
from compactfusion_xdit.codecs import cpu as cpu_codecs
from compactfusion_xdit.codecs import fused

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


class Timer:
    """Median seconds of a call on `device`: perf_counter (CPU), do_bench (CUDA + Triton), CUDA events."""

    def __init__(self, device: torch.device, reps: int, warmup: int):
        self.device, self.reps, self.warmup = device, reps, warmup
        self.do_bench = None
        if device.type == "cuda" and fused.triton_available():
            from triton.testing import do_bench

            self.do_bench = do_bench
        self.name = ("perf_counter" if device.type != "cuda" else
                     "triton do_bench (L2 flushed, median)" if self.do_bench else "cuda events (median)")

    def __call__(self, fn) -> float:
        if self.do_bench is not None:
            return 1e-3 * self.do_bench(fn, return_mode="median")
        for _ in range(self.warmup):
            fn()
        times = []
        for _ in range(self.reps):
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return statistics.median(times)

    def graph(self, fn) -> float:
        """Median seconds of a CUDA-graph replay of fn (captured after warm-up on a side stream)."""
        fn()
        torch.cuda.synchronize()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return self(graph.replay)


def copy_bandwidth(timer: Timer) -> float | None:
    if timer.device.type != "cuda":
        return None
    x = torch.empty(256 * 2**20, dtype=torch.uint8, device=timer.device)
    t = timer(lambda: x.clone())
    return 2 * x.numel() / t / 1e9


def _graph_times(name, x, base, timer: Timer) -> dict:
    """Fused residual encode/decode as CUDA-graph replays, in us; {} where the codec has no kernel."""
    if not fused.supports(name, x):
        return {}
    work = base.clone()
    tensors = fused.encode_tensors(name, x, work)
    try:
        enc = timer.graph(lambda: fused.encode_tensors(name, x, work))
        dec = timer.graph(lambda: fused.decode_tensors(name, tensors, tuple(x.shape), x.dtype, base=work))
    except RuntimeError as err:  # a capture failure costs the two columns, not the run
        print(f"warning: CUDA-graph timing of {name} failed: {err}", file=sys.stderr)
        return {}
    return {"encode_graph_us": enc * 1e6, "decode_graph_us": dec * 1e6}


def bench_one(name, mode, n, c, dtype, device, timer: Timer, graph: bool = False):
    codec = codecs.get(name)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(n, c, generator=g, device=device).to(dtype)
    base = (x.float() + 0.1 * torch.randn(n, c, generator=g, device=device)).to(dtype)
    raw = x.numel() * x.element_size()
    payload_bytes = codec.payload_nbytes((n, c), dtype)
    extra = {"backend": backend_name(name, x)}
    if mode == "residual":
        work = base.clone()
        p = codec.encode_residual(x, work)
        t_enc = timer(lambda: codec.encode_residual(x, work.copy_(base)))
        t_copy = timer(lambda: work.copy_(base))
        t_enc = max(t_enc - t_copy, 1e-9)  # the copy only restores the cache between runs
        t_dec = timer(lambda: codec.decode_residual(p, work))
        enc_bytes, dec_bytes = 3 * raw + payload_bytes, 2 * raw + payload_bytes
        if graph:
            extra = _graph_times(name, x, base, timer)
    else:
        p = codec.encode(x)
        t_enc = timer(lambda: codec.encode(x))
        t_dec = timer(lambda: codec.decode(p))
        enc_bytes = dec_bytes = raw + payload_bytes
    return {
        "codec": name, "mode": mode, "N": n, "C": c, "dtype": str(dtype).replace("torch.", ""),
        "encode_us": t_enc * 1e6, "decode_us": t_dec * 1e6,
        "encode_GBps": enc_bytes / t_enc / 1e9, "decode_GBps": dec_bytes / t_dec / 1e9,
        "payload_bytes": payload_bytes, "raw_bytes": raw,
        "ratio_vs_fp16": (n * c * 2) / payload_bytes, "ratio_vs_dtype": raw / payload_bytes, **extra,
    }


def backend_name(name, x) -> str:
    """Which implementation codes `x` with codec `name` now: fused (Triton), cpu (numba) or torch."""
    backend = codec_base._fused_backend(name, x)
    return "torch" if backend is None else backend.__name__.rsplit(".", 1)[-1]


def sweep_num_warps(timer: Timer, channels: int, sizes: list[int]) -> list[dict]:
    """Median residual int4 encode/decode times at each num_warps (fp16 and bf16)."""
    from compactfusion_xdit.codecs.fused import rowwise

    out = []
    for dtype in (torch.float16, torch.bfloat16):
        for n in sizes:
            x = torch.randn(n, channels, device=timer.device).to(dtype)
            base = (x.float() + 0.3 * torch.randn_like(x, dtype=torch.float32)).to(dtype)
            data, scale = rowwise.row_encode("int4", x, base.clone())
            for w in (1, 2, 4, 8, 16):
                enc = 1e6 * timer(lambda: rowwise.row_encode("int4", x, base, num_warps=w))
                dec = 1e6 * timer(lambda: rowwise.row_decode("int4", data, scale, (n, channels), dtype,
                                                             base=base, num_warps=w))
                dt = str(dtype).replace("torch.", "")
                out.append({"dtype": dt, "N": n, "num_warps": w, "enc_us": enc, "dec_us": dec})
                print(f"sweep int4 {dt:8} N={n:6d} warps={w:2d} enc {enc:8.1f} us dec {dec:8.1f} us")
    return out


def print_table(rows: list[dict], device: torch.device, bw: float | None, timer: Timer) -> None:
    graphs = any("encode_graph_us" in r for r in rows)
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}   timer: {timer.name}"
          + (f"   copy bandwidth {bw:.0f} GB/s" if bw else ""))
    print(f"{'codec':>10} {'mode':>8} {'path':>7} {'backend':>7} {'dtype':>8} {'N':>6} {'C':>5} {'enc us':>9} {'enc GB/s':>9} "
          f"{'dec us':>9} {'dec GB/s':>9} {'x fp16':>7} {'x dtype':>7}"
          + (" enc %copy dec %copy" if bw else "") + (" enc graph dec graph" if graphs else ""))
    for r in rows:
        line = (f"{r['codec']:>10} {r['mode']:>8} {r['path']:>7} {r.get('backend', '-'):>7} {r['dtype']:>8} {r['N']:>6} {r['C']:>5} "
                f"{r['encode_us']:>9.1f} {r['encode_GBps']:>9.2f} {r['decode_us']:>9.1f} {r['decode_GBps']:>9.2f} "
                f"{r['ratio_vs_fp16']:>7.2f} {r['ratio_vs_dtype']:>7.2f}")
        if bw:
            line += f" {100 * r['encode_GBps'] / bw:>9.1f} {100 * r['decode_GBps'] / bw:>9.1f}"
        if graphs:
            line += (f" {r['encode_graph_us']:>9.1f} {r['decode_graph_us']:>9.1f}" if "encode_graph_us" in r
                     else f" {'-':>9} {'-':>9}")
        print(line)


def _median_p10(fn, reps: int, warmup: int) -> tuple[float, float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return statistics.median(times), times[len(times) // 10]


def bench_block(names, dtypes, sizes, links: int, reps: int | None) -> list[dict]:
    """encode_block / decode_block (residual, error feedback) vs the torch path link by link."""
    rows = []
    for name in names:
        if name not in cpu_codecs.CPU_CODECS:
            continue
        codec = codecs.get(name)
        for dtype in dtypes:
            for n, c in sizes:
                big = n * c >= 1 << 20
                nrep = reps or (7 if big else 2000)
                warm = 1 if big else 100
                g = torch.Generator().manual_seed(0)
                x = torch.randn(links, n, c, generator=g).to(dtype)
                base = (x.float() + 0.1 * torch.randn(links, n, c, generator=g)).to(dtype)
                out = torch.empty_like(x)
                P = codec.payload_nbytes((n, c), dtype)
                wire = torch.zeros(links, P, dtype=torch.uint8)
                raw = n * c * x.element_size()
                for skip in (-1, 0):
                    coded = links - (skip >= 0)
                    work = base.clone()
                    enc = _median_p10(lambda: cpu_codecs.encode_block(name, x, work, wire, 0, skip, True), nrep, warm)
                    dec = _median_p10(lambda: cpu_codecs.decode_block(name, wire, 0, work, out, skip, True, src3=x),
                                      nrep, warm)
                    with force_torch(True):
                        tw = base.clone()
                        ps = [codec.encode_residual(x[l], tw[l]) for l in range(links)]
                        todo = [l for l in range(links) if l != skip]
                        tenc = _median_p10(lambda: [codec.encode_residual(x[l], tw[l]) for l in todo], nrep // 10 + 1, 1)
                        tdec = _median_p10(lambda: [codec.decode_residual(ps[l], tw[l]) for l in todo], nrep // 10 + 1, 1)
                    moved = coded * (3 * raw + P)
                    rows.append({"codec": name, "dtype": str(dtype).replace("torch.", ""), "L": links, "skip": skip,
                                 "N": n, "C": c, "encode_us": enc[0] * 1e6, "encode_p10_us": enc[1] * 1e6,
                                 "decode_us": dec[0] * 1e6, "decode_p10_us": dec[1] * 1e6,
                                 "encode_GBps": moved / enc[0] / 1e9, "decode_GBps": moved / dec[0] / 1e9,
                                 "torch_encode_us": tenc[0] * 1e6, "torch_decode_us": tdec[0] * 1e6,
                                 "torch_encode_GBps": moved / tenc[0] / 1e9, "torch_decode_GBps": moved / tdec[0] / 1e9})
    print(f"{'codec':>6} {'dtype':>8} {'L':>2} {'skip':>4} {'N':>5} {'C':>5} | {'enc us (p10)':>15} {'dec us (p10)':>15} "
          f"{'enc GB/s':>8} {'dec GB/s':>8} | {'torch enc us':>12} {'torch dec us':>12} {'GB/s':>5} {'GB/s':>5}")
    for r in rows:
        print(f"{r['codec']:>6} {r['dtype']:>8} {r['L']:>2} {r['skip']:>4} {r['N']:>5} {r['C']:>5} | "
              f"{r['encode_us']:>7.1f} ({r['encode_p10_us']:>5.1f}) {r['decode_us']:>7.1f} ({r['decode_p10_us']:>5.1f}) "
              f"{r['encode_GBps']:>8.2f} {r['decode_GBps']:>8.2f} | {r['torch_encode_us']:>12.1f} "
              f"{r['torch_decode_us']:>12.1f} {r['torch_encode_GBps']:>5.2f} {r['torch_decode_GBps']:>5.2f}")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--codecs", default=",".join(DEFAULT_CODECS))
    ap.add_argument("--modes", default="residual,plain")
    ap.add_argument("--sizes", default="1024,4096,16384", help="token counts N")
    ap.add_argument("--channels", type=int, default=3072)
    ap.add_argument("--dtype", default="float16", help="comma list of float16,bfloat16,float32")
    ap.add_argument("--path", choices=["torch", "fused", "both"], default="fused",
                    help="fused = the default dispatch (fused kernels where available)")
    ap.add_argument("--reps", type=int, default=None, help="timed runs without Triton (CPU, CUDA events)")
    ap.add_argument("--graph-max-n", type=int, default=4096,
                    help="CUDA: also time the fused residual kernels as a CUDA-graph replay up to this N (0: never)")
    ap.add_argument("--sweep-warps", action="store_true", help="CUDA + Triton: time residual int4 at each num_warps")
    ap.add_argument("--threads", type=int, default=1, help="CPU: torch threads (the compiled codecs use one)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes and few reps (smoke test)")
    ap.add_argument("--json", default=None, help="write results here")
    ap.add_argument("--block", action="store_true", help="CPU: time codecs.cpu.encode_block/decode_block instead")
    ap.add_argument("--links", type=int, default=2, help="--block: links L per call")
    ap.add_argument("--block-sizes", default="64x64,256x64,4096x3072", help="--block: NxC list")
    args = ap.parse_args(argv)
    if args.block:
        torch.set_num_threads(args.threads)
        t0 = time.perf_counter()
        if not cpu_codecs.ensure_compiled():
            print(f"error: the compiled CPU codecs are unavailable ({cpu_codecs.status()})", file=sys.stderr)
            return 2
        print(f"compiled CPU codecs ready after {time.perf_counter() - t0:.2f} s")
        sizes = [(8, 16)] if args.quick else [tuple(int(v) for v in s.split("x")) for s in args.block_sizes.split(",")]
        names = [s for s in args.codecs.split(",") if s]
        rows = bench_block(names, [DTYPES[d] for d in args.dtype.split(",")], sizes, args.links,
                           2 if args.quick else args.reps)
        if args.json:
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            with open(args.json, "w") as f:
                json.dump({"device": "cpu", "torch": torch.__version__, "threads": args.threads, "block": rows}, f, indent=1)
        return 0

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is available; use --device cpu", file=sys.stderr)
        return 2
    if args.sweep_warps and (device.type != "cuda" or not fused.triton_available()):
        print("error: --sweep-warps times the Triton kernels: it needs --device cuda and triton", file=sys.stderr)
        return 2
    names = [s for s in args.codecs.split(",") if s]
    for name in names:
        codecs.get(name)  # fail fast on a bad name
    sizes = [64] if args.quick else [int(s) for s in args.sizes.split(",")]
    channels = 96 if args.quick else args.channels
    reps = args.reps or (2 if args.quick else (50 if device.type == "cuda" else 5))
    warmup = 1 if args.quick else (10 if device.type == "cuda" else 1)
    timer = Timer(device, reps, warmup)
    paths = {"torch": [True], "fused": [False], "both": [True, False]}[args.path]
    dtypes = [DTYPES[d] for d in args.dtype.split(",")]
    compile_s = None
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
        if False in paths:
            t0 = time.perf_counter()
            ready = cpu_codecs.ensure_compiled()
            compile_s = time.perf_counter() - t0
            print(f"compiled CPU codecs: {cpu_codecs.status()} after {compile_s:.2f} s"
                  + ("" if ready else " (the default path is the torch reference)"))

    rows = []
    for force in paths:
        with force_torch(force):
            for name in names:
                for mode in args.modes.split(","):
                    if name == "none" and mode == "residual":
                        continue
                    for dtype in dtypes:
                        for n in sizes:
                            graph = device.type == "cuda" and not force and n <= args.graph_max_n
                            row = bench_one(name, mode, n, channels, dtype, device, timer, graph)
                            row["path"] = "torch" if force else "default"
                            rows.append(row)
    sweep = sweep_num_warps(timer, channels, sizes) if args.sweep_warps else []
    bw = copy_bandwidth(timer)
    print_table(rows, device, bw, timer)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        triton_version = __import__("triton").__version__ if fused.triton_available() else None
        with open(args.json, "w") as f:
            json.dump({"device": str(device), "copy_GBps": bw, "torch": torch.__version__, "triton": triton_version,
                       "timer": timer.name, "rows": rows, "num_warps_sweep": sweep,
                       "cpu_compile_s": compile_s, "threads": args.threads if device.type == "cpu" else None}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
