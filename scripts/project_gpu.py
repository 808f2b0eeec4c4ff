"""PROJECTION of per-step time of Flux-size inference on N GPUs, per method x codec x link rate.

    python scripts/project_gpu.py --out proj                         # from recorded figures (no GPU)
    python scripts/project_gpu.py --device cuda --out proj           # measure block + codecs on this GPU first
    python scripts/project_gpu.py --device cpu --tiny --out /tmp/p   # smoke run of the measuring code (CI)

Nothing here runs N GPUs: a per-step time is *computed* from measured or recorded one-GPU
figures with the model below. It is a projection, labelled so in every output.

Figures (``figures`` in the JSON; each carries its source):
- compute per block (one double-stream and one single-stream Flux block, bf16, 4096 image + 512
  text tokens, hidden 3072, 24 heads x 128) on one GPU: measured with ``--device cuda``; otherwise
  ``--from-json FILE`` or, by default, an estimate = the block's matmul FLOPs / an assumed achieved
  bf16 throughput (``--assumed-tflops``, default 500: about half an H100 SXM's dense peak).
- codec encode/decode time per element and wire bytes per element: by default the fused-kernel
  H100 figures of docs/results/bench_fused_h100.json (fp16, C = 3072, N = 1024..16384 tokens,
  residual coding with error feedback; least-squares fit t = a + b * tokens); with
  ``--device cuda`` measured here with the project's codecs.
- links: nominal per-GPU, per-direction bandwidth and a per-message latency (LINKS below).

Model (steady state after warm-up steps; compute splits evenly over ranks; codec kernels share the
GPU with compute, so they never overlap it; Flux = 19 double + 38 single blocks):
- Ulysses: per block, all-to-all of q, k, v before attention and of the output after; nothing
  overlaps (attention needs them). comm = 4 tensors x (T/N) x H x 2 B x (N-1)/N per rank.
- Ring: per block, N-1 K/V hops of 2 x (T/N) x H; each hop overlaps the attention of the chunk in
  hand (the non-attention part of the block does not overlap). Coded: encode own K/V once, decode
  each received chunk; the compressed payload is forwarded as is.
- PipeFusion: stages of L/N blocks; per step each stage sends its T x H activations (in patches)
  to the next, asynchronously: step = max(compute/N + codec, transfer). Pipeline fill ignored.
- Patch (DistriFusion) sync: per block, all-gather of K/V slices (each rank sends its
  2 x (T/N) x H to N-1 peers), not overlapped. Displaced: the same traffic, overlapped with the
  whole step (stale K/V): step = max(compute/N + codec, transfer).
- Step (ParaStep): N steps evaluated concurrently (one model evaluation per window of N steps per
  rank); per window N-1 noise predictions (latent-sized, 4096 x 64) go to rank 0 and the latent is
  broadcast back, not overlapped. Its outputs differ from sequential sampling (predicted steps).
Compressed bytes per tensor come from the codec's exact payload size. ``none`` sends raw bf16.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: name -> (bytes/s per GPU per direction, seconds of latency per message), nominal figures.
LINKS = {
    "nvlink4 (450 GB/s)": (450e9, 5e-6),
    "pcie5 x16 (64 GB/s)": (64e9, 10e-6),
    "pcie4 x16 (32 GB/s)": (32e9, 10e-6),
    "ib ndr 400G (50 GB/s)": (50e9, 10e-6),
    "100 GbE (12.5 GB/s)": (12.5e9, 20e-6),
    "25 GbE (3.1 GB/s)": (3.125e9, 30e-6),
    "10 GbE (1.25 GB/s)": (1.25e9, 30e-6),
    "1 GbE (125 MB/s)": (125e6, 50e-6),
}
METHODS = ("ulysses", "ring", "pipefusion", "patch", "displaced", "step")
CODECS = ("none", "residual-int4", "residual-int2", "residual-1bit", "plain-int4")
FLUX = {"double": 19, "single": 38, "hidden": 3072, "heads": 24, "head_dim": 128, "img_tokens": 4096,
        "txt_tokens": 512, "latent_channels": 64}
TINY = {"double": 2, "single": 2, "hidden": 64, "heads": 4, "head_dim": 16, "img_tokens": 256, "txt_tokens": 32,
        "latent_channels": 16}
FUSED_JSON = os.path.join(ROOT, "docs", "results", "bench_fused_h100.json")


# ---------------------------------------------------------------------------------------------
# Figures: estimated, recorded, or measured
# ---------------------------------------------------------------------------------------------


def block_flops(geom: dict) -> dict:
    """Matmul FLOPs of one double and one single block over T = image + text tokens."""
    t, h = geom["img_tokens"] + geom["txt_tokens"], geom["hidden"]
    attn = 4 * t * t * h  # QK^T and PV
    double = 2 * t * h * h * (3 + 1 + 8) + attn  # qkv, out proj, MLP 4x (both streams together)
    single = 2 * t * h * h * (3 + 4 + 5) + attn  # fused qkv+mlp in, (attn + mlp) -> h out
    return {"double": double, "single": single, "attention": attn}


def estimated_figures(geom: dict, tflops: float) -> dict:
    flops = block_flops(geom)
    return {"double_block_s": flops["double"] / (tflops * 1e12), "single_block_s": flops["single"] / (tflops * 1e12),
            "attention_fraction": flops["attention"] / flops["double"],
            "source": f"estimate: block matmul FLOPs / {tflops:g} TFLOP/s (assumed achieved bf16 throughput)"}


def _fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares t = a + b x (b >= 0)."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.mean(xs), statistics.mean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    b = max(0.0, sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var) if var else 0.0
    return max(0.0, my - b * mx), b


def recorded_codec_figures(path: str = FUSED_JSON) -> dict:
    """Per codec: encode/decode seconds = a + b * elements, wire bytes per element (2-byte input)."""
    with open(path) as f:
        data = json.load(f)
    out = {}
    for codec in ("int4", "int2", "1bit"):
        rows = [r for r in data["rows"] if r["codec"] == codec]
        if not rows:
            continue
        enc = _fit([(r["N"] * r["C"], r["fused_enc_us"] * 1e-6) for r in rows])
        dec = _fit([(r["N"] * r["C"], r["fused_dec_us"] * 1e-6) for r in rows])
        per_elem = statistics.mean(r["payload_bytes"] / (r["N"] * r["C"]) for r in rows)
        out[codec] = {"enc_a": enc[0], "enc_b": enc[1], "dec_a": dec[0], "dec_b": dec[1], "bytes_per_elem": per_elem}
    return {"codecs": out, "source": f"{os.path.relpath(path, ROOT)} ({data.get('device', '?')}, fused kernels, "
            "fp16, residual with EF; least-squares fit over N)"}


def _timer(device):
    import torch

    if device.type == "cuda":
        def run(fn, reps):
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
            times = []
            for _ in range(reps):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                torch.cuda.synchronize()
                times.append(a.elapsed_time(b) * 1e-3)
            return statistics.median(times)
    else:
        def run(fn, reps):
            fn()
            times = []
            for _ in range(reps):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
            return statistics.median(times)
    return run


def measure_figures(geom: dict, device_name: str, reps: int) -> dict:
    """Time one double and one single Flux block (random weights) and the codecs on `device_name`."""
    import torch
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock

    from compactfusion_xdit import codecs

    device = torch.device(device_name)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    h, heads, hd = geom["hidden"], geom["heads"], geom["head_dim"]
    n_img, n_txt = geom["img_tokens"], geom["txt_tokens"]
    gen = torch.Generator(device="cpu").manual_seed(0)
    img = torch.randn(1, n_img, h, generator=gen).to(device, dtype)
    txt = torch.randn(1, n_txt, h, generator=gen).to(device, dtype)
    temb = torch.randn(1, h, generator=gen).to(device, dtype)
    angles = torch.rand(n_img + n_txt, hd // 2, generator=gen).to(device) * math.pi
    rope = (angles.cos().repeat_interleave(2, -1).to(dtype), angles.sin().repeat_interleave(2, -1).to(dtype))
    timer = _timer(device)
    out = {}
    with torch.no_grad():
        double = FluxTransformerBlock(h, heads, hd).to(device, dtype).eval()
        out["double_block_s"] = timer(lambda: double(img, txt, temb, image_rotary_emb=rope), reps)
        del double
        single = FluxSingleTransformerBlock(h, heads, hd).to(device, dtype).eval()
        out["single_block_s"] = timer(lambda: single(img, txt, temb, image_rotary_emb=rope), reps)
        del single
        # attention alone, for the ring model's overlap
        q = torch.randn(1, heads, n_img + n_txt, hd, generator=gen).to(device, dtype)
        out["attention_s"] = timer(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q), reps)
    out["attention_fraction"] = min(1.0, out["attention_s"] / out["double_block_s"])
    out["source"] = f"measured here on {_device_label(device)} ({dtype}, random weights, median of {reps})"
    codec_rows = {}
    x = torch.randn(n_img, h, generator=gen).to(device, torch.float16 if device.type == "cuda" else torch.float32)
    for name in ("int4", "int2", "1bit"):
        codec = codecs.get(name)
        base = torch.zeros_like(x)
        payload = codec.encode_residual(x, base.clone())

        def enc():
            codec.encode_residual(x, base.clone())

        def dec():
            codec.decode_residual(payload, base.clone())

        elems = x.numel()
        clone_s = timer(lambda: base.clone(), reps)
        codec_rows[name] = {"enc_a": 0.0, "enc_b": max(0.0, timer(enc, reps) - clone_s) / elems,
                            "dec_a": 0.0, "dec_b": max(0.0, timer(dec, reps) - clone_s) / elems,
                            "bytes_per_elem": codec.payload_nbytes(tuple(x.shape), torch.float16) / elems}
    codecs_out = {"codecs": codec_rows, "source": f"measured here on {_device_label(device)} "
                  f"(project codecs, residual with EF, {n_img}x{h})"}
    return {"compute": out, "codec": codecs_out}


def _device_label(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"CPU ({platform.processor() or platform.machine()})"


# ---------------------------------------------------------------------------------------------
# The projection
# ---------------------------------------------------------------------------------------------


def _codec_costs(codec_name: str, codec_figs: dict) -> tuple[float, float, float, float, float]:
    """(bytes per element on the wire, enc a, enc b, dec a, dec b); raw bf16 for none."""
    if codec_name == "none":
        return 2.0, 0.0, 0.0, 0.0, 0.0
    inner = codec_name.split("-", 1)[1] if codec_name.startswith(("residual-", "plain-")) else codec_name
    inner = inner.replace("-noef", "")
    c = codec_figs["codecs"][inner]
    return c["bytes_per_elem"], c["enc_a"], c["enc_b"], c["dec_a"], c["dec_b"]


def project_step(method: str, n: int, link: tuple[float, float], codec_name: str, geom: dict,
                 compute: dict, codec_figs: dict) -> dict:
    """Seconds per denoising step and its parts, under the module docstring's model."""
    bw, alpha = link
    t, h = geom["img_tokens"] + geom["txt_tokens"], geom["hidden"]
    blocks = geom["double"] + geom["single"]
    full = geom["double"] * compute["double_block_s"] + geom["single"] * compute["single_block_s"]
    per_block = full / blocks
    attn = per_block * compute["attention_fraction"]
    bpe, ea, eb, da, db = _codec_costs(codec_name, codec_figs)

    def enc(elems):
        return ea + eb * elems if codec_name != "none" else 0.0

    def dec(elems):
        return da + db * elems if codec_name != "none" else 0.0

    shard = (t / n) * h  # elements of one tensor slice on one rank
    if method == "ulysses":
        wire = 4 * shard * (n - 1) / n * bpe
        comm = 2 * alpha * (n - 1) + wire / bw
        codec = 4 * (enc(shard) + dec(shard))
        step = blocks * (per_block / n + codec + comm)
        exposed = blocks * comm
    elif method == "ring":
        hop = 2 * shard * bpe
        chunk_attn = attn / (n * n)
        hop_time = alpha + hop / bw
        codec = 2 * enc(shard)
        per = (per_block - attn) / n + chunk_attn + codec + (n - 1) * max(chunk_attn + 2 * dec(shard), hop_time)
        step = blocks * per
        exposed = blocks * (n - 1) * max(0.0, hop_time - chunk_attn - 2 * dec(shard))
        comm = (n - 1) * hop_time
    elif method == "pipefusion":
        elems = geom["img_tokens"] * h
        comm = n * alpha + elems * bpe / bw  # n patches per step
        codec = enc(elems) + dec(elems)
        step = max(full / n + codec, comm)
        exposed = max(0.0, comm - full / n - codec)
    elif method in ("patch", "displaced"):
        comm_block = alpha * (n - 1) + 2 * shard * (n - 1) * bpe / bw
        codec_block = 2 * enc(shard) + 2 * (n - 1) * dec(shard)
        if method == "patch":
            step = blocks * (per_block / n + codec_block + comm_block)
            exposed = blocks * comm_block
        else:
            step = max(blocks * (per_block / n + codec_block), blocks * comm_block)
            exposed = max(0.0, blocks * (comm_block - per_block / n - codec_block))
        comm = comm_block
    elif method == "step":
        elems = geom["img_tokens"] * geom["latent_channels"]
        window_comm = 2 * ((n - 1) * alpha + (n - 1) * elems * bpe / bw)  # gather to rank 0, broadcast back
        codec = 2 * (n - 1) * (enc(elems) + dec(elems))
        step = (full + codec + window_comm) / n
        exposed = window_comm / n
        comm = window_comm
    else:
        raise ValueError(method)
    return {"step_s": step, "exposed_comm_s": exposed, "comm_share": exposed / step if step else 0.0,
            "single_gpu_step_s": full}


def project(compute: dict, codec_figs: dict, geom: dict, ranks=(2, 4, 8), links=LINKS, methods=METHODS,
            codec_names=CODECS) -> list[dict]:
    rows = []
    for n in ranks:
        for link_name, link in links.items():
            for method in methods:
                base = None
                for codec in codec_names:
                    r = project_step(method, n, link, codec, geom, compute, codec_figs)
                    if codec == "none":
                        base = r["step_s"]
                    rows.append({"ranks": n, "link": link_name, "method": method, "codec": codec, **r,
                                 "speedup_vs_none": base / r["step_s"] if base else None,
                                 "speedup_vs_single_gpu": r["single_gpu_step_s"] / r["step_s"]})
    return rows


def markdown(result: dict) -> str:
    lines = ["**PROJECTION, not a measurement**: per-step milliseconds computed from one-GPU figures with the model "
             "in `scripts/project_gpu.py` (in brackets: speed-up over the same method uncompressed).", "",
             f"- block compute: {result['figures']['compute']['source']}: double {1e3 * result['figures']['compute']['double_block_s']:.2f} ms, "
             f"single {1e3 * result['figures']['compute']['single_block_s']:.2f} ms, attention "
             f"{100 * result['figures']['compute']['attention_fraction']:.0f} % of a block; one GPU: "
             f"{1e3 * result['rows'][0]['single_gpu_step_s']:.0f} ms per step",
             f"- codecs: {result['figures']['codec']['source']}", "- links: nominal per-direction bandwidth", ""]
    for n in result["ranks"]:
        lines += [f"N = {n}:", "", "| link | method | " + " | ".join(result["codecs"]) + " | exposed comm (none) |",
                  "| --- | --- | " + " | ".join("---" for _ in result["codecs"]) + " | --- |"]
        for link in result["links"]:
            for method in result["methods"]:
                cells, share = [], ""
                for codec in result["codecs"]:
                    r = next(x for x in result["rows"] if (x["ranks"], x["link"], x["method"], x["codec"]) ==
                             (n, link, method, codec))
                    cells.append(f"{1e3 * r['step_s']:.0f}" + ("" if codec == "none" else f" ({r['speedup_vs_none']:.1f}x)"))
                    if codec == "none":
                        share = f"{100 * r['comm_share']:.0f} %"
                lines.append(f"| {link} | {method} | " + " | ".join(cells) + f" | {share} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--device", default=None, help="cuda: measure the block and codecs on this GPU; cpu: measure "
                   "on the CPU (with --tiny, a smoke run); default: no measurement, use recorded figures")
    p.add_argument("--tiny", action="store_true", help="a tiny block geometry (smoke runs of the measuring code)")
    p.add_argument("--from-json", default=None, metavar="FILE",
                   help="figures from a previous run's JSON ('figures' key) instead of the defaults")
    p.add_argument("--assumed-tflops", type=float, default=500.0, help="for the compute estimate (default 500)")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--ranks", default="2,4,8")
    p.add_argument("--out", default="project_gpu_out")
    opts = p.parse_args(argv)
    geom = TINY if opts.tiny else FLUX
    if opts.device:
        import torch

        if opts.device.startswith("cuda") and not torch.cuda.is_available():
            print("project_gpu: error: --device cuda but no GPU is visible; drop --device to project from recorded "
                  "figures", file=sys.stderr)
            return 2
        figures = measure_figures(geom, opts.device, opts.reps)
    elif opts.from_json:
        if not os.path.isfile(opts.from_json):
            print(f"project_gpu: error: --from-json {opts.from_json!r} does not exist", file=sys.stderr)
            return 2
        with open(opts.from_json) as f:
            figures = json.load(f)["figures"]
    else:
        figures = {"compute": estimated_figures(geom, opts.assumed_tflops), "codec": recorded_codec_figures()}
    ranks = tuple(int(r) for r in opts.ranks.split(","))
    result = {"label": "PROJECTION (computed from one-GPU figures, not measured on N GPUs)", "geometry": geom,
              "figures": figures, "ranks": list(ranks), "links": list(LINKS), "methods": list(METHODS),
              "codecs": list(CODECS), "link_figures": {k: {"bytes_per_s": v[0], "latency_s": v[1]} for k, v in LINKS.items()},
              "command": " ".join(["python", "scripts/project_gpu.py", *(argv if argv is not None else sys.argv[1:])]),
              "rows": project(figures["compute"], figures["codec"], geom, ranks)}
    os.makedirs(opts.out, exist_ok=True)
    with open(os.path.join(opts.out, "project_gpu.json"), "w") as f:
        json.dump(result, f)
    with open(os.path.join(opts.out, "project_gpu.md"), "w") as f:
        f.write(markdown(result))
    print(f"wrote {opts.out}/project_gpu.json and project_gpu.md ({result['label']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
