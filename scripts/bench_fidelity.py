"""Fidelity of every parallel method x codec against the single-process uncompressed output.

    python scripts/bench_fidelity.py --ranks 4 --out bench_fidelity_out          # digits-flux, 20 steps
    python scripts/bench_fidelity.py --quick --out /tmp/f                         # CI: 2 ranks, 2 codecs
    python scripts/bench_fidelity.py --lpips-weights lpips_alex.pt ...           # adds LPIPS

For a prompt set x seeds, each method runs every codec (one launch per method, one process group
per codec; CPU ranks over gloo on loopback) and each output image is compared with the
single-process, uncompressed image of the same prompt and seed: PSNR (uint8, peak 255) and SSIM
(Gaussian 11x11, sigma 1.5) per image, then averaged; identical images count as 100 dB in the mean.
The error-feedback ablation (residual with EF, residual without EF, plain quantisation of x) runs
on ``--ablation-methods`` as its own table. ``--lpips-weights`` takes a local TorchScript module
``f(a, b) -> distance`` over NCHW images in [-1, 1] (e.g. an LPIPS network exported with
torch.jit.trace); no weights are downloaded.

Writes ``<out>/bench_fidelity.json`` (per image and averaged) and ``bench_fidelity.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import sys
import time

import numpy as np

from compactfusion_xdit.benchmarks import methods as bench_methods
from compactfusion_xdit.benchmarks import metrics
from compactfusion_xdit.benchmarks.launch import BenchError, launch, run_stoppable

DEFAULT_CODECS = "none,residual-int4,residual-int2,residual-1bit,plain-int4"
ABLATION_CODECS = ("int4", "int2", "1bit")
PSNR_CAP_DB = 100.0


def parse_options(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--methods", default="all", help=f"comma list of {', '.join(bench_methods.ALL_METHODS)}, or all")
    p.add_argument("--codecs", default=DEFAULT_CODECS)
    p.add_argument("--ablation-methods", default="ulysses,ring",
                   help="methods of the error-feedback ablation table ('' to skip)")
    p.add_argument("--model", default=None, help="default: digits-flux if this checkout has it, else tiny-flux")
    p.add_argument("--height", type=int, default=None, help="default 16 for digits-flux, 64 otherwise")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--prompts", default=None, help="'|'-separated prompts (default: digits 0-9 for digits-flux, "
                   "'a cat|a dog|the cat' otherwise)")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--lpips-weights", default=None, metavar="PATH", help="local TorchScript LPIPS module (optional)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per launch")
    p.add_argument("--out", default="bench_fidelity_out")
    p.add_argument("--quick", action="store_true", help="CI: 2 ranks, ulysses, none + residual-int4 + plain-int4, "
                   "tiny-flux 32x32, 4 steps, one prompt and seed, no ablation")
    opts = p.parse_args(argv)
    if opts.quick:
        opts.ranks, opts.methods, opts.codecs, opts.ablation_methods = 2, "ulysses", "none,residual-int4,int4", ""
        opts.model, opts.height, opts.width, opts.steps, opts.prompts, opts.seeds = "tiny-flux", 32, 32, 4, "a cat", "0"
    return opts


def _prompts(opts, model: str) -> list[str]:
    if opts.prompts:
        return [p.strip() for p in opts.prompts.split("|") if p.strip()]
    if model == "digits-flux":
        from compactfusion_xdit.models import digits

        return [digits.prompt(d) for d in range(10)]
    return ["a cat", "a dog", "the cat"]


def _ablation_codecs() -> list[str]:
    out = []
    for c in ABLATION_CODECS:
        out += [f"residual-{c}", f"residual-{c}-noef", f"plain-{c}"]
    return out


class Lpips:
    """A local TorchScript LPIPS-style module: distance(a, b) for uint8 HWC images."""

    def __init__(self, path: str) -> None:
        import torch

        if not os.path.isfile(path):
            raise ValueError(f"--lpips-weights {path!r} does not exist; pass a local TorchScript file or drop the flag")
        self.torch = torch
        self.module = torch.jit.load(path, map_location="cpu").eval()

    def __call__(self, a: np.ndarray, b: np.ndarray) -> float:
        t = self.torch

        def tensor(x):
            return t.from_numpy(x.astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]

        with t.no_grad():
            return float(self.module(tensor(a), tensor(b)).flatten()[0])


def score(reference: list, images: list, items: list[dict], lpips: Lpips | None) -> dict:
    per_image = []
    for item, ref, img in zip(items, reference, images):
        if ref is None or img is None:
            per_image.append({**item, "psnr_db": None, "ssim": None, "missing": True})
            continue
        value = metrics.psnr(ref, img)
        entry = {**item, "psnr_db": metrics.finite_or_none(value), "identical": math.isinf(value),
                 "ssim": metrics.ssim(ref, img)}
        if lpips is not None:
            entry["lpips"] = lpips(ref, img)
        per_image.append(entry)
    scored = [e for e in per_image if not e.get("missing")]
    summary = {"images": len(scored), "missing": len(per_image) - len(scored), "per_image": per_image}
    if scored:
        capped = [PSNR_CAP_DB if e["identical"] else min(e["psnr_db"], PSNR_CAP_DB) for e in scored]
        summary.update(psnr_db=statistics.mean(capped), psnr_min_db=min(capped),
                       ssim=statistics.mean(e["ssim"] for e in scored),
                       identical=sum(e["identical"] for e in scored))
        if lpips is not None:
            summary["lpips"] = statistics.mean(e["lpips"] for e in scored)
    return summary


def run(opts, out_dir: str | None = None) -> dict:
    from compactfusion_xdit import cli

    model = opts.model or bench_methods.default_model()
    side = 16 if model == "digits-flux" else 64
    opts.height, opts.width = opts.height or side, opts.width or side
    lpips = Lpips(opts.lpips_weights) if opts.lpips_weights else None
    chosen = bench_methods.parse_methods(opts.methods, opts.ranks)
    ablation = bench_methods.parse_methods(opts.ablation_methods, opts.ranks) if opts.ablation_methods else []
    codecs = [c.strip() for c in opts.codecs.split(",") if c.strip()]
    items = [{"prompt": p, "seed": int(s)} for p in _prompts(opts, model) for s in opts.seeds.split(",")]
    path = cli.model_path(model)
    base = ["--model", path, "--height", str(opts.height), "--width", str(opts.width), "--num_inference_steps",
            str(opts.steps), "--prompt", items[0]["prompt"], "--max_sequence_length", "16", "--output_type", "pil"]
    result = {"model": model, "height": opts.height, "width": opts.width, "steps": opts.steps, "ranks": opts.ranks,
              "items": items, "psnr_cap_db": PSNR_CAP_DB, "lpips": bool(lpips),
              "command": shlex.join(["python", "scripts/bench_fidelity.py", *sys.argv[1:]]), "rows": [], "ablation": []}
    started = time.monotonic()
    reference = launch([base + ["--compression", "none"]], 1, ["unshaped"], 0, opts.timeout,
                       port=cli._free_port(), items=items)[0]["images"]
    print(f"reference: {len(items)} images ({time.monotonic() - started:.0f} s)", flush=True)
    plan = {m: list(codecs) for m in chosen}
    for m in ablation:
        plan.setdefault(m, [])
        plan[m] += [c for c in _ablation_codecs() if c not in plan[m]]
    for method, names in plan.items():
        started = time.monotonic()
        flags = bench_methods.method_flags(method, opts.ranks)
        runs = [base + ["--compression", c] + flags for c in names]
        try:
            outs = launch(runs, opts.ranks, ["unshaped"], 0, opts.timeout * len(names), port=cli._free_port(),
                          items=items)
        except BenchError as err:
            for c in names:
                result["rows"].append({"method": method, "codec": c, "error": str(err)})
            print(f"{method}: failed: {str(err)[:400]}", flush=True)
            continue
        print(f"{method} ({time.monotonic() - started:.0f} s):", flush=True)
        for codec, out in zip(names, outs):
            traffic = out["phases"][0]
            row = {"method": method, "codec": codec, "raw_bytes": traffic["raw_bytes"],
                   "sent_bytes": traffic["sent_bytes"], **score(reference, out["images"], items, lpips)}
            (result["rows"] if codec in codecs else result["ablation"]).append(row)
            if method in ablation and codec in _ablation_codecs() and codec in codecs:
                result["ablation"].append(row)
            print(f"  {codec:20s} PSNR {row.get('psnr_db', float('nan')):.1f} dB  SSIM {row.get('ssim', float('nan')):.4f}",
                  flush=True)
        if out_dir:  # what is measured so far survives an interrupted run
            write(result, out_dir)
    return result


def _ratio(row) -> str:
    return f"{row['raw_bytes'] / row['sent_bytes']:.2f}x" if row.get("sent_bytes") else "1.00x"


def markdown(result: dict) -> str:
    lp = result["lpips"]
    out = [f"`{result['model']}` {result['height']}x{result['width']}, {result['steps']} steps, {result['ranks']} ranks, "
           f"{len(result['items'])} images (prompts x seeds) per row; against the single-process uncompressed output. "
           f"Mean PSNR counts identical images as {result['psnr_cap_db']:.0f} dB.\n",
           "| method | codec | mean PSNR dB | min PSNR dB | identical | mean SSIM |" + (" LPIPS |" if lp else "")
           + " raw/sent |", "| --- | --- | --- | --- | --- | --- |" + (" --- |" if lp else "") + " --- |"]
    for r in result["rows"]:
        if "error" in r or r.get("psnr_db") is None:
            what = "failed" if "error" in r else "no output image"
            out.append(f"| {r['method']} | {r['codec']} | {what} | | | |" + (" |" if lp else "") + " |")
            continue
        out.append(f"| {r['method']} | {r['codec']} | {r['psnr_db']:.1f} | {r['psnr_min_db']:.1f} | "
                   f"{r['identical']}/{r['images']} | {r['ssim']:.4f} |" + (f" {r['lpips']:.4f} |" if lp else "")
                   + f" {_ratio(r)} |")
    if result["ablation"]:
        out += ["", "Error-feedback ablation (mean PSNR dB / mean SSIM):", "",
                "| method | codec | residual + EF | residual, no EF | plain (x quantised) |", "| --- | --- | --- | --- | --- |"]
        by = {(r["method"], r["codec"]): r for r in result["ablation"] if r.get("psnr_db") is not None}
        for method in dict.fromkeys(r["method"] for r in result["ablation"]):
            for c in ABLATION_CODECS:
                cells = []
                for name in (f"residual-{c}", f"residual-{c}-noef", f"plain-{c}"):
                    r = by.get((method, name))
                    cells.append("–" if r is None else f"{r['psnr_db']:.1f} / {r['ssim']:.4f}")
                out.append(f"| {method} | {c} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def write(result: dict, out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "bench_fidelity.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(out_dir, "bench_fidelity.md"), "w") as f:
        f.write(markdown(result))


def main(argv: list[str] | None = None) -> int:
    opts = parse_options(argv)
    rc, result = run_stoppable("bench_fidelity", lambda: run(opts, opts.out), "rank processes stopped")
    if rc:
        return rc
    write(result, opts.out)
    print(f"wrote {opts.out}/bench_fidelity.json and bench_fidelity.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
