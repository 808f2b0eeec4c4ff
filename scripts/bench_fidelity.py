"""Fidelity and bytes of every parallel method x codec against one process and against no compression.

    python scripts/bench_fidelity.py --ranks 4 --out bench_fidelity_out          # digits-flux, 20 steps
    python scripts/bench_fidelity.py --quick --out /tmp/f                         # CI: 2 ranks, 2 codecs
    python scripts/bench_fidelity.py --lpips-weights lpips_alex.pt ...           # adds LPIPS
    python scripts/bench_fidelity.py --path ring --ranks 2 --model tiny-flux --steps 8 --height 64 --width 64 \
        --codecs residual-int8,residual-int4,residual-int2,residual-1bit,int4 --check   # one path's table
    python scripts/bench_fidelity.py --path step --ranks 2 --extra="--step_parallel_warmup 1" ...

Image table (no ``--path``):

For a prompt set x seeds, each method runs every codec (one launch per method, one process group
per codec; CPU ranks over gloo on loopback) and each output image is compared with the
single-process, uncompressed image of the same prompt and seed: PSNR (uint8, peak 255) and SSIM
(Gaussian 11x11, sigma 1.5) per image, then averaged; identical images count as 100 dB in the mean.
The error-feedback ablation (residual with EF, residual without EF, plain quantisation of x) runs
on ``--ablation-methods`` as its own table. ``--lpips-weights`` takes a local TorchScript module
``f(a, b) -> distance`` over NCHW images in [-1, 1] (e.g. an LPIPS network exported with
torch.jit.trace); no weights are downloaded.

Writes ``<out>/bench_fidelity.json`` (per image and averaged) and ``bench_fidelity.md``.

Per-path table (``--path METHOD``, one of ``compactfusion_xdit.benchmarks.methods.ALL_METHODS``):
one launch of ``--ranks`` ranks runs METHOD once per codec (``none`` first), and one process runs
the uncompressed model; every output is kept as the pipeline returns it (``--output latent``, the
default: the final latents). Per codec: PSNR against the single process (``--against single``) and
against METHOD with ``--compression none`` (``--against uncompressed``), both over the reference's
value range (``metrics.range_psnr``; with ``--output pil``, uint8 PSNR and SSIM; with ``--output waveform``,
an audio pipeline's waveform SNR, ``metrics.snr``), averaged over
prompts x seeds (identical outputs are counted, not averaged; all identical reads "identical"), the
largest absolute difference, and the bytes of METHOD's path(s) summed over ranks: raw (what the
uncompressed exchange would send), sent, raw/sent, messages; ``--check`` adds the residual-cache
consistency check. ``--only-path`` compresses only METHOD's path(s); ``--extra`` appends worker
flags (e.g. another warm-up). Writes ``<out>/bench_fidelity_<METHOD>.json`` and ``.md``.
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
from compactfusion_xdit.benchmarks.runs import BenchError, launch, run_stoppable
from compactfusion_xdit.cli import ports

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
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default 20; 4 with --quick)")
    p.add_argument("--prompts", default=None, help="'|'-separated prompts (default: digits 0-9 for digits-flux, "
                   "'a cat|a dog|the cat' otherwise)")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--lpips-weights", default=None, metavar="PATH", help="local TorchScript LPIPS module (optional)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per launch")
    p.add_argument("--out", default="bench_fidelity_out")
    p.add_argument("--quick", action="store_true", help="CI: 2 ranks, ulysses (or --path), none + residual-int4 + "
                   "plain-int4, tiny-flux 32x32, 4 steps, one prompt and seed, no ablation")
    g = p.add_argument_group("per-path table")
    g.add_argument("--path", default=None, choices=bench_methods.ALL_METHODS,
                   help="one method's table: PSNR vs one process / vs uncompressed, and its path's raw/sent bytes")
    g.add_argument("--output", choices=["latent", "pil", "waveform"], default="latent",
                   help="what --path compares: the final latents (range PSNR), the images (uint8 PSNR, SSIM) or "
                   "an audio pipeline's waveforms (SNR)")
    g.add_argument("--against", default="single,uncompressed",
                   help="comma list of references for --path: single (one process, no compression), "
                   "uncompressed (the same method, --compression none)")
    g.add_argument("--extra", default="", help="worker flags appended to every --path run, e.g. "
                   "--extra='--step_parallel_warmup 1' or --extra='--compression-warmup 2'")
    g.add_argument("--input", default="", help="worker flags appended to every --path run and to the one-process "
                   "reference: the input, e.g. --input='--num_frames 9 --guidance_scale 5.0'")
    g.add_argument("--only-path", action="store_true", help="compress only the method's path(s) (--compression-paths)")
    g.add_argument("--check", action="store_true", help="check the residual caches agree (--compression-check)")
    opts = p.parse_args(argv)
    if opts.quick:
        opts.ranks, opts.codecs, opts.ablation_methods = 2, "none,residual-int4,int4", ""
        opts.methods = "ulysses"
        opts.model, opts.height, opts.width, opts.prompts, opts.seeds = "tiny-flux", 32, 32, "a cat", "0"
    opts.steps = opts.steps or (4 if opts.quick else 20)  # a --steps given with --quick is kept
    against = [a.strip() for a in opts.against.split(",") if a.strip()]
    if not against or set(against) - {"single", "uncompressed"}:
        p.error(f"--against {opts.against!r}: a comma list of single, uncompressed")
    opts.against = against
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
    from compactfusion_xdit.cli import plan as cli_plan

    model = opts.model or bench_methods.default_model()
    side = 16 if model == "digits-flux" else 64
    opts.height, opts.width = opts.height or side, opts.width or side
    lpips = Lpips(opts.lpips_weights) if opts.lpips_weights else None
    chosen = bench_methods.parse_methods(opts.methods, opts.ranks)
    ablation = bench_methods.parse_methods(opts.ablation_methods, opts.ranks) if opts.ablation_methods else []
    codecs = [c.strip() for c in opts.codecs.split(",") if c.strip()]
    items = [{"prompt": p, "seed": int(s)} for p in _prompts(opts, model) for s in opts.seeds.split(",")]
    path = cli_plan.model_path(model)
    base = ["--model", path, "--height", str(opts.height), "--width", str(opts.width), "--num_inference_steps",
            str(opts.steps), "--prompt", items[0]["prompt"], "--max_sequence_length", "16", "--output_type", "pil"]
    result = {"model": model, "height": opts.height, "width": opts.width, "steps": opts.steps, "ranks": opts.ranks,
              "items": items, "psnr_cap_db": PSNR_CAP_DB, "lpips": bool(lpips),
              "command": shlex.join(["python", "scripts/bench_fidelity.py", *sys.argv[1:]]), "rows": [], "ablation": []}
    started = time.monotonic()
    reference = launch([base + ["--compression", "none"]], 1, ["unshaped"], 0, opts.timeout,
                       port=ports.free_port(), items=items)[0]["images"]
    print(f"reference: {len(items)} images ({time.monotonic() - started:.0f} s)", flush=True)
    todo = {m: list(codecs) for m in chosen}
    for m in ablation:
        todo.setdefault(m, [])
        todo[m] += [c for c in _ablation_codecs() if c not in todo[m]]
    for method, names in todo.items():
        started = time.monotonic()
        flags = bench_methods.method_flags(method, opts.ranks)
        runs = [base + ["--compression", c] + flags for c in names]
        try:
            outs = launch(runs, opts.ranks, ["unshaped"], 0, opts.timeout * len(names), port=ports.free_port(),
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


# ------------------------------------------------------------------------------------------------
# Per-path table (--path)
# ------------------------------------------------------------------------------------------------

REFERENCE_LABELS = {"single": "one process", "uncompressed": "uncompressed"}


def compare(reference: list, outputs: list, kind: str) -> dict:
    """Per-item PSNR (and SSIM for images) of `outputs` against `reference`, summarised: mean PSNR
    over the items that differ, how many are identical, the minimum, the largest |difference|."""
    values, ssims, diffs, missing = [], [], [], 0
    for ref, out in zip(reference, outputs):
        if ref is None or out is None:
            missing += 1
            continue
        if kind == "latent":
            values.append(metrics.range_psnr(ref, out))
        elif kind == "waveform":
            values.append(metrics.snr(ref, out))
        else:
            values.append(metrics.psnr(ref, out))
            ssims.append(metrics.ssim(ref, out))
        diffs.append(float(np.max(np.abs(np.asarray(ref, np.float64) - np.asarray(out, np.float64)))))
    finite = [v for v in values if math.isfinite(v)]
    summary = {"psnr_db": statistics.mean(finite) if finite else None, "psnr_min_db": min(finite) if finite else None,
               "identical": len(values) - len(finite), "compared": len(values), "missing": missing,
               "max_abs_diff": max(diffs) if diffs else None,
               "per_item_psnr_db": [metrics.finite_or_none(v) for v in values]}
    if ssims:
        summary["ssim"] = statistics.mean(ssims)
    return summary


def run_path(opts, out_dir: str | None = None) -> dict:
    """The per-path table: METHOD per codec against one process and against METHOD uncompressed."""
    from compactfusion_xdit.benchmarks import path_runs
    from compactfusion_xdit.cli import plan as cli_plan
    from compactfusion_xdit.testing import RankFailure

    method = opts.path
    model = opts.model or bench_methods.default_model()
    side = 16 if model == "digits-flux" else 64
    opts.height, opts.width = opts.height or side, opts.width or side
    if method not in bench_methods.available_methods():
        raise ValueError(f"method {method!r} needs the parallel-mode flags, which this checkout lacks")
    flags = bench_methods.method_flags(method, opts.ranks) + shlex.split(opts.extra)
    paths = bench_methods.METHOD_PATHS[method].split(",")
    codecs = ["none"] + [c.strip() for c in opts.codecs.split(",") if c.strip() and c.strip() != "none"]
    items = [{"prompt": p, "seed": int(s)} for p in _prompts(opts, model) for s in opts.seeds.split(",")]
    base = ["--model", cli_plan.model_path(model), "--height", str(opts.height), "--width", str(opts.width),
            "--num_inference_steps", str(opts.steps), "--prompt", items[0]["prompt"], "--max_sequence_length", "16",
            "--output_type", "pil" if opts.output == "waveform" else opts.output, *shlex.split(opts.input)]
    if "pixart" in model.lower():
        base.append("--no_use_resolution_binning")
    coded = (["--compression-paths", ",".join(paths)] if opts.only_path else []) + (
        ["--compression-check"] if opts.check else [])
    result = {"path": method, "paths": paths, "model": model, "height": opts.height, "width": opts.width,
              "steps": opts.steps, "ranks": opts.ranks, "items": items, "output": opts.output,
              "against": opts.against, "flags": flags + coded,
              "command": shlex.join(["python", "scripts/bench_fidelity.py", *sys.argv[1:]]), "rows": []}

    def serve(runs, ranks, what):
        started = time.monotonic()
        try:
            outs = path_runs.serve_on_ranks(runs, ranks, items, opts.timeout * len(runs))
        except RankFailure as err:
            raise BenchError(f"{what} failed: {str(err)[-3000:]}") from None
        print(f"{what}: {len(runs)} run(s) x {len(items)} item(s) ({time.monotonic() - started:.0f} s)", flush=True)
        return outs

    single = None
    if "single" in opts.against:
        single = [e["output"] for e in serve([base + ["--compression", "none"]], 1, "one process")[0]]
    runs = [base + flags + ["--compression", c] + ([] if c == "none" else coded) for c in codecs]
    outs = serve(runs, opts.ranks, f"{method} on {opts.ranks} ranks")
    uncompressed = [e["output"] for e in outs[0]]
    for codec, entries in zip(codecs, outs):
        images = [e["output"] for e in entries]
        traffic = entries[0]["traffic"]
        own = path_runs.path_traffic(traffic, paths)
        row = {"method": method, "codec": codec, **own,
               "ratio": own["raw_bytes"] / own["sent_bytes"] if own["sent_bytes"] else None,
               "total_raw_bytes": traffic["raw_bytes"], "total_sent_bytes": traffic["sent_bytes"],
               "cache_consistent": traffic["cache_consistent"]}
        if single is not None:
            row["vs_single"] = compare(single, images, opts.output)
        if "uncompressed" in opts.against:
            row["vs_uncompressed"] = compare(uncompressed, images, opts.output)
        result["rows"].append(row)
        print("  " + _path_line(row, opts.against), flush=True)
    if out_dir:
        write_path(result, out_dir)
    return result


def _db(summary: dict | None) -> str:
    if summary is None or summary["compared"] == 0:
        return "no output"
    if summary["psnr_db"] is None:
        return "identical"
    tail = f" ({summary['identical']} identical)" if summary["identical"] else ""
    return f"{summary['psnr_db']:.2f}{tail}"


def _path_line(row: dict, against: list[str]) -> str:
    cells = [f"{row['codec']:18s}"]
    for ref in against:
        cells.append(f"PSNR vs {REFERENCE_LABELS[ref]} {_db(row.get('vs_' + ref))} dB")
    ratio = f"{row['ratio']:.2f}x" if row["ratio"] else "-"
    cells.append(f"raw {row['raw_bytes']} sent {row['sent_bytes']} ratio {ratio}")
    return "  ".join(cells)


def path_markdown(result: dict) -> str:
    against, pil = result["against"], result["output"] == "pil"
    what = {"pil": "images (uint8 PSNR, SSIM)", "waveform": "waveforms (SNR; the PSNR columns hold it)"}.get(
        result["output"], "final latents (PSNR over the reference's max - min)")
    out = [f"`{result['model']}` {result['height']}x{result['width']}, {result['steps']} steps, path "
           f"`{result['path']}` on {result['ranks']} ranks (`{' '.join(result['flags'])}`), {len(result['items'])} "
           f"item(s) (prompts x seeds); {what}; bytes of {', '.join(result['paths'])} summed over ranks.\n"]
    head, rule = ["codec"], ["---"]
    for ref in against:
        head += [f"PSNR vs {REFERENCE_LABELS[ref]} dB", f"max abs diff vs {REFERENCE_LABELS[ref]}"]
        rule += ["---", "---"]
        if pil:
            head.append(f"SSIM vs {REFERENCE_LABELS[ref]}")
            rule.append("---")
    head += ["raw bytes", "sent bytes", "raw/sent", "caches agree"]
    rule += ["---"] * 4
    out += ["| " + " | ".join(head) + " |", "| " + " | ".join(rule) + " |"]
    for r in result["rows"]:
        cells = [r["codec"]]
        for ref in against:
            s = r.get("vs_" + ref)
            cells += [_db(s), "-" if s is None or s["max_abs_diff"] is None else f"{s['max_abs_diff']:.2e}"]
            if pil:
                cells.append(f"{s['ssim']:.4f}" if s and "ssim" in s else "-")
        consistent = {None: "-", True: "yes", False: "NO"}[r["cache_consistent"]]
        cells += [str(r["raw_bytes"]), str(r["sent_bytes"]), f"{r['ratio']:.2f}x" if r["ratio"] else "-", consistent]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def write_path(result: dict, out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, f"bench_fidelity_{result['path']}")
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(path_markdown(result))


def main(argv: list[str] | None = None) -> int:
    opts = parse_options(argv)
    body = (lambda: run_path(opts, opts.out)) if opts.path else (lambda: run(opts, opts.out))
    rc, result = run_stoppable("bench_fidelity", body, "rank processes stopped")
    if rc:
        return rc
    if opts.path:
        write_path(result, opts.out)
        print(f"wrote {opts.out}/bench_fidelity_{opts.path}.json and .md")
        return 0
    write(result, opts.out)
    print(f"wrote {opts.out}/bench_fidelity.json and bench_fidelity.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
