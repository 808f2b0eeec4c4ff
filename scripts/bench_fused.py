"""Benchmark the fused Triton codec kernels against the torch path on a CUDA device.

    python scripts/bench_fused.py --device cuda --json out/bench_fused.json

Per codec, size (N x C) and dtype: median time of residual encode (error feedback on) and
residual decode, fused and torch, and the effective bandwidth over the fewest bytes each must move
(encode: read x + read base + write base + write payload; decode: read payload + read base +
write base), next to the device's measured copy bandwidth (read + write of a 1 GiB copy).
Times come from triton.testing.do_bench (CUDA events, L2 flushed before each run, median); the
small sizes are also timed as a CUDA-graph replay of the whole encode call (launch overhead out).
"""
import argparse
import importlib.util
import json
import os
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from compactfusion_xdit.codecs import fused  # noqa: E402


def _torch_path():
    """(encode_residual, decode_residual, label) of the torch path: the codecs package's if it is
    there, else the plain-torch transcription of docs/codec_format.md used by the tests."""
    try:
        from compactfusion_xdit import codecs
        codecs.get("int4")

        def enc(name, x, base):
            return _forced_torch(codecs.get(name).encode_residual, x, base)

        def dec(name, payload, base):
            _forced_torch(codecs.get(name).decode_residual, payload, base)
        return enc, dec, "codecs torch path (CFX_FORCE_TORCH=1)"
    except Exception:  # noqa: BLE001 - any failure means: fall back to the transcription
        spec = importlib.util.spec_from_file_location(
            "_fused_reference", os.path.join(REPO, "tests", "_fused_reference.py"))
        ref = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(ref)
        return ref.encode_residual, ref.decode_residual, "doc transcription (tests/_fused_reference.py)"


def _forced_torch(fn, *args):
    old = os.environ.get("CFX_FORCE_TORCH")
    os.environ["CFX_FORCE_TORCH"] = "1"
    try:
        return fn(*args)
    finally:
        if old is None:
            del os.environ["CFX_FORCE_TORCH"]
        else:
            os.environ["CFX_FORCE_TORCH"] = old


def _payload_nbytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def copy_bandwidth(do_bench):
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda").random_(0, 255)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    del src, dst
    return 2 * n / (ms * 1e-3) / 1e9


def graph_time_us(fn, do_bench):
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
    return 1e3 * do_bench(graph.replay, warmup=50, rep=300, return_mode="median")


def bench_case(name, N, C, dtype, torch_enc, torch_dec, do_bench, graph):
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(N, C, device="cuda", dtype=torch.float32, generator=gen).to(dtype)
    base = (x.float() + 0.3 * torch.randn(N, C, device="cuda", generator=gen)).to(dtype)
    tensors = fused.encode_tensors(name, x, base.clone())
    act = N * C * x.element_size()
    enc_bytes = 3 * act + _payload_nbytes(tensors)
    dec_bytes = 2 * act + _payload_nbytes(tensors)
    row = {"codec": name, "N": N, "C": C, "dtype": str(dtype).replace("torch.", ""),
           "payload_bytes": _payload_nbytes(tensors), "enc_bytes": enc_bytes, "dec_bytes": dec_bytes}
    b = base.clone()
    row["fused_enc_us"] = 1e3 * do_bench(lambda: fused.encode_tensors(name, x, b), return_mode="median")
    row["fused_dec_us"] = 1e3 * do_bench(
        lambda: fused.decode_tensors(name, tensors, (N, C), dtype, base=b), return_mode="median")
    payload = torch_enc(name, x, base.clone())
    row["torch_enc_us"] = 1e3 * do_bench(lambda: torch_enc(name, x, b), return_mode="median")
    row["torch_dec_us"] = 1e3 * do_bench(lambda: torch_dec(name, payload, b), return_mode="median")
    if graph:
        row["fused_enc_graph_us"] = graph_time_us(lambda: fused.encode_tensors(name, x, b), do_bench)
        row["fused_dec_graph_us"] = graph_time_us(
            lambda: fused.decode_tensors(name, tensors, (N, C), dtype, base=b), do_bench)
    for path in ("fused", "torch"):
        row[f"{path}_enc_GBps"] = enc_bytes / (row[f"{path}_enc_us"] * 1e-6) / 1e9
        row[f"{path}_dec_GBps"] = dec_bytes / (row[f"{path}_dec_us"] * 1e-6) / 1e9
    return row


def sweep_num_warps(do_bench, channels):
    """Median times of residual int4 encode/decode at each num_warps (launch tuning aid)."""
    from compactfusion_xdit.codecs.fused import rowwise
    out = []
    for dtype in (torch.float16, torch.bfloat16):
        for N in (4096, 16384):
            x = torch.randn(N, channels, device="cuda").to(dtype)
            base = (x.float() + 0.3 * torch.randn_like(x, dtype=torch.float32)).to(dtype)
            data, scale = rowwise.row_encode("int4", x, base.clone())
            for w in (1, 2, 4, 8, 16):
                enc = 1e3 * do_bench(lambda: rowwise.row_encode("int4", x, base, num_warps=w),
                                     return_mode="median")
                dec = 1e3 * do_bench(lambda: rowwise.row_decode("int4", data, scale, (N, channels),
                                                                dtype, base=base, num_warps=w),
                                     return_mode="median")
                out.append({"dtype": str(dtype)[6:], "N": N, "num_warps": w, "enc_us": enc, "dec_us": dec})
                print(f"sweep int4 {str(dtype)[6:]:8} N={N:6d} warps={w:2d} enc {enc:8.1f} us dec {dec:8.1f} us")
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda"])
    parser.add_argument("--codecs", default="int8,int4,int2,1bit")
    parser.add_argument("--sizes", default="1024,4096,16384", help="comma-separated N")
    parser.add_argument("--channels", type=int, default=3072)
    parser.add_argument("--dtypes", default="float16,bfloat16")
    parser.add_argument("--graph-max-n", type=int, default=4096, help="graph-replay timing up to this N")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--sweep", action="store_true", help="also time int4 at each num_warps")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() or not fused.triton_available():
        sys.exit("bench_fused.py needs a CUDA device and triton; the fused path runs only there")
    from triton.testing import do_bench

    torch_enc, torch_dec, torch_label = _torch_path()
    copy_gbps = copy_bandwidth(do_bench)
    sweep = sweep_num_warps(do_bench, args.channels) if args.sweep else []
    rows = []
    for name in args.codecs.split(","):
        for dt in args.dtypes.split(","):
            for n in (int(s) for s in args.sizes.split(",")):
                rows.append(bench_case(name, n, args.channels, getattr(torch, dt), torch_enc,
                                       torch_dec, do_bench, graph=n <= args.graph_max_n))
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "triton": __import__("triton").__version__, "copy_GBps": copy_gbps,
              "torch_path": torch_label, "rows": rows, "num_warps_sweep": sweep}
    print(f"device {result['device']}  copy {copy_gbps:.0f} GB/s (read+write)  torch path: {torch_label}")
    hdr = (f"{'codec':6} {'dtype':8} {'N':>6} | {'enc us':>8} {'GB/s':>6} {'%copy':>5} {'graph':>7} | "
           f"{'dec us':>8} {'GB/s':>6} {'%copy':>5} {'graph':>7} | {'torch enc':>9} {'torch dec':>9}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        ge = f"{r['fused_enc_graph_us']:7.1f}" if "fused_enc_graph_us" in r else f"{'-':>7}"
        gd = f"{r['fused_dec_graph_us']:7.1f}" if "fused_dec_graph_us" in r else f"{'-':>7}"
        print(f"{r['codec']:6} {r['dtype']:8} {r['N']:6d} | {r['fused_enc_us']:8.1f} "
              f"{r['fused_enc_GBps']:6.0f} {100 * r['fused_enc_GBps'] / copy_gbps:5.0f} {ge} | "
              f"{r['fused_dec_us']:8.1f} {r['fused_dec_GBps']:6.0f} "
              f"{100 * r['fused_dec_GBps'] / copy_gbps:5.0f} {gd} | {r['torch_enc_us']:9.1f} "
              f"{r['torch_dec_us']:9.1f}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
