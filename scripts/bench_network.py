"""End-to-end latency of compressed parallel inference over emulated, rate-limited links.

    sudo python scripts/bench_network.py --ranks 4 --rates 100mbit,1gbit,10gbit,unshaped \\
        --methods all --codecs none,residual-int4,residual-int2,residual-1bit,plain-int4 --out bench_out
    sudo python scripts/bench_network.py --quick --out /tmp/q     # CI: 2 ranks, 1 rate, 2 codecs
    sudo python scripts/bench_network.py --codecs none,auto,residual-int4 --out bench_auto  # auto vs fixed
    sudo python scripts/bench_network.py --cleanup                # remove what a killed run left

Every rank runs in its own network namespace; the namespaces form a star of veth links through a
bridge in a hub namespace, and every link is shaped with tc (tbf, both directions) to the rate of
the current phase, so each rank's up- and downlink run at that rate and all inter-rank traffic
(gloo, bound with GLOO_SOCKET_IFNAME; the rendezvous too) crosses them. One launch per
method x codec loads the model once and serves, per rate, one warm-up request and ``--requests``
measured ones (the median is reported). Bytes come from the plugin's counters (raw: what the
uncompressed exchange sends; sent: what was sent), PSNR compares the output image with a
single-process uncompressed run of the same seed (``sdxl-patch``, displaced patch parallelism on
bands of latent rows, runs its own model, built-in ``tiny-sdxl`` at 64x64, and its own reference). ``comm share`` s is the uncompressed
exchange's part of the request at a rate: measured, 1 - T_none(unshaped) / T_none(rate), when the
rates include ``unshaped`` (they do by default; the time the link actually adds, which counts a
pipeline's transfers that overlap compute as free), else estimated from the bytes (per-rank raw
bytes at the link rate / T_none(rate)). Both are in the JSON. The bound 1 / ((1 - s) + s / r),
r = raw / sent bytes, is the speed-up the byte ratio allows; efficiency = speed-up / bound.
The compiled CPU codecs are built (once per machine) before the ranks start, so every rank codes
with them, as a user's ranks do after their first run.

Writes ``<out>/bench_network.json``, ``bench_network.md`` and ``bench_network.png``. Needs root,
``ip`` and ``tc``; removes its namespaces, links and qdiscs on exit, Ctrl-C or failure.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time

import numpy as np

from compactfusion_xdit.benchmarks import methods as bench_methods
from compactfusion_xdit.benchmarks import metrics, netns
from compactfusion_xdit.benchmarks.runs import BenchError, launch, run_stoppable
from compactfusion_xdit.core.config import CompressionConfig
from compactfusion_xdit.cli import ports

DEFAULT_CODECS = "none,residual-int4,residual-int2,residual-1bit,plain-int4"
DEFAULT_RATES = "100mbit,1gbit,10gbit,unshaped"


def parse_options(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--rates", default=DEFAULT_RATES, help=f"comma list of NNN(k|m|g)bit or unshaped ({DEFAULT_RATES})")
    p.add_argument("--methods", default="all", help=f"comma list of {', '.join(bench_methods.ALL_METHODS)}, or all")
    p.add_argument("--codecs", default=DEFAULT_CODECS, help=f"comma list of compression names ({DEFAULT_CODECS})")
    p.add_argument("--model", default=None, help="built-in model or diffusers folder (default: digits-flux if "
                   "this checkout has it, else tiny-flux)")
    p.add_argument("--height", type=int, default=None, help="default: 128 for tiny-flux, the model's own size else")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--prompt", default="a cat")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--requests", type=int, default=3, help="measured requests per rate, after one warm-up (3)")
    p.add_argument("--rounds", type=int, default=1, help="run every codec this many times per method, in turn "
                   "(none, int4, ..., none, int4, ...), and pool each cell's requests: a stretch of minutes in "
                   "which the machine runs slow then touches every codec alike (1)")
    p.add_argument("--pin", action="store_true", help="bind rank r to the r-th CPU (one core per rank)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per codec run (all its rates)")
    p.add_argument("--out", default="bench_network_out")
    p.add_argument("--quick", action="store_true", help="CI: 2 ranks, 1gbit, ulysses, none + residual-int4, "
                   "tiny-flux 64x64, 4 steps, 1 measured request")
    p.add_argument("--cleanup", action="store_true", help="remove leftovers of a killed run and exit (with --tag: "
                   "that run's only; without: every cfxb-* namespace, so not while another benchmark runs)")
    p.add_argument("--tag", default=None, help="5 hex digits naming this run's namespaces cfxb-TAG-* (default: from the pid)")
    p.add_argument("--fail-after-setup", action="store_true", help=argparse.SUPPRESS)  # tests: simulated failure
    opts = p.parse_args(argv)
    if opts.requests < 1:  # the first request of each phase warms up and is never reported as latency
        p.error(f"--requests {opts.requests}: at least one measured request is needed after the warm-up")
    if opts.rounds < 1:
        p.error(f"--rounds {opts.rounds}: at least one round is needed")
    if opts.quick:
        opts.ranks, opts.rates, opts.methods, opts.codecs = 2, "1gbit", "ulysses", "none,residual-int4"
        opts.model, opts.height, opts.width, opts.steps, opts.requests = "tiny-flux", 64, 64, 4, 1
    for codec in opts.codecs.split(","):  # a bad name fails here, not in every launch
        try:
            CompressionConfig.parse(codec.strip())
        except ValueError as err:
            p.error(f"--codecs: {err}")
    return opts


# ---------------------------------------------------------------------------------------------
# Launches
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# Rows, table, plot
# ---------------------------------------------------------------------------------------------


def worker_argv(opts, model_path: str, codec: str, method_flags: list[str]) -> list[str]:
    return ["--model", model_path, "--height", str(opts.height), "--width", str(opts.width),
            "--num_inference_steps", str(opts.steps), "--prompt", opts.prompt, "--seed", str(opts.seed),
            "--max_sequence_length", "16", "--output_type", "pil", "--compression", codec, *method_flags]


def pool_rounds(outs: list[dict], n_codecs: int) -> list[dict]:
    """One entry per codec from a launch whose runs were the codecs in turn, round after round:
    per phase every round's measured requests (``latencies_s``, in round order; ``rounds_s``: each
    round's median), the first round's warm-up and image, the last round's traffic and auto report
    (auto has settled by then, as within one round)."""
    pooled = []
    for c in range(n_codecs):
        mine = outs[c::n_codecs]
        phases = []
        for k, last in enumerate(mine[-1]["phases"]):
            rounds = [out["phases"][k]["latencies_s"] for out in mine]
            phases.append({**last, "warmup_s": mine[0]["phases"][k]["warmup_s"],
                           "latencies_s": [t for lat in rounds for t in lat],
                           "rounds_s": [statistics.median(lat) for lat in rounds]})
        pooled.append({**mine[0], "phases": phases})
    return pooled


def build_rows(method: str, codec: str, rates: list[str], result: dict, reference: np.ndarray | None,
               ranks: int) -> list[dict]:
    image = result["image"]
    quality = None
    if image is not None and reference is not None:
        quality = metrics.finite_or_none(metrics.psnr(reference, image))
    rows = []
    for rate, phase in zip(rates, result["phases"]):
        lat = phase["latencies_s"]
        rows.append({"method": method, "codec": codec, "rate": rate, "ranks": ranks,
                     "latency_s": statistics.median(lat), "latencies_s": lat, "warmup_s": phase["warmup_s"],
                     "rounds_s": phase.get("rounds_s", [statistics.median(lat)]),
                     "raw_bytes": phase["raw_bytes"], "sent_bytes": phase["sent_bytes"],
                     "psnr_db": quality, "identical": image is not None and reference is not None and quality is None,
                     **({"auto": phase["auto"]} if phase.get("auto") else {})})
    return rows


def fill_derived(rows: list[dict]) -> None:
    """Raw bytes of the uncompressed runs (not counted by the plugin) from a coded run of the same
    method; speed-up against ``none``; the uncompressed exchange's share of a request (measured
    against the unshaped run when there is one, else from the bytes); and for coded rows the
    efficiency (`efficiency`)."""
    by_key = {(r["method"], r["codec"], r["rate"]): r for r in rows if "error" not in r}
    raw_of = {}
    for r in by_key.values():
        if r["codec"] != "none" and r["raw_bytes"]:
            raw_of.setdefault(r["method"], r["raw_bytes"])
    for r in by_key.values():
        if r["codec"] == "none":
            r["raw_bytes"] = raw_of.get(r["method"])
            r["sent_bytes"] = r["raw_bytes"]
        base = by_key.get((r["method"], "none", r["rate"]))
        r["speedup_vs_none"] = base["latency_s"] / r["latency_s"] if base else None
        bits = netns.parse_rate(r["rate"])
        raw = raw_of.get(r["method"])
        fast = by_key.get((r["method"], "none", "unshaped"))
        r["comm_share_bytes"] = (min(1.0, (raw / r["ranks"]) * 8 / bits / base["latency_s"])
                                 if base and bits and raw else None)
        r["comm_share_measured"] = (max(0.0, 1.0 - fast["latency_s"] / base["latency_s"])
                                    if base and fast and bits else None)
        r["comm_share_none"] = (r["comm_share_measured"] if r["comm_share_measured"] is not None
                                else r["comm_share_bytes"])
    for r in by_key.values():
        base = by_key.get((r["method"], "none", r["rate"]))
        r.update(efficiency(r, None if base is None else base.get("comm_share_none")))


def efficiency(row: dict, share: float | None) -> dict:
    """The byte-ratio bound and how much of it a coded row reached.

    With `share` s the uncompressed exchange's share of the request and r = raw / sent bytes, coding
    can at best turn the request time T into T((1 - s) + s / r), a speed-up of 1 / ((1 - s) + s / r):
    the ``bound``. ``efficiency`` is the measured speed-up over that bound (1: coding cost nothing)."""
    raw, sent, speedup = row.get("raw_bytes"), row.get("sent_bytes"), row.get("speedup_vs_none")
    if row["codec"] == "none" or share is None or not raw or not sent or speedup is None:
        return {"byte_ratio": None, "bound": None, "efficiency": None}
    ratio = raw / sent
    bound = 1.0 / ((1.0 - share) + share / ratio)
    return {"byte_ratio": ratio, "bound": bound, "efficiency": speedup / bound}


def _mb(n) -> str:
    return "–" if n is None else f"{n / 1e6:.2f}"


def _requests(result: dict) -> str:
    rounds = result.get("rounds", 1)
    each = f"{result['requests']} requests after a warm-up"
    return each if rounds == 1 else f"{rounds} rounds x {each} (codecs run in turn, round after round)"


def markdown(result: dict) -> str:
    """Rows: method x codec; columns: latency (speed-up over none) per rate; then bytes and PSNR."""
    rows = [r for r in result["rows"] if "error" not in r]
    rates = result["rates"]
    head = (f"{result['ranks']} ranks, model `{result['model']}` {result['height']}x{result['width']}, "
            f"{result['steps']} steps; median latency of {_requests(result)}, in seconds "
            f"(speed-up over the same method uncompressed); single-process latency "
            f"{result['single_latency_s']:.2f} s. Bytes: summed over ranks per request.\n\n")
    own = [f"`{m}` runs `{model}` {h}x{w} (PSNR against its own single process)"
           for m, (model, h, w) in bench_methods.OWN_MODELS.items() if m in result["methods"]]
    if own:
        head = head[:-2] + " " + "; ".join(own) + ".\n\n"
    lines = ["| method | codec | " + " | ".join(rates) + " | sent MB | raw MB | PSNR dB |",
             "| --- | --- | " + " | ".join("---" for _ in rates) + " | --- | --- | --- |"]
    by = {(r["method"], r["codec"], r["rate"]): r for r in rows}
    shares = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        for codec in dict.fromkeys(r["codec"] for r in rows if r["method"] == method):
            cells, any_row = [], None
            for rate in rates:
                r = by.get((method, codec, rate))
                if r is None:
                    cells.append("–")
                    continue
                any_row = r
                sp = r.get("speedup_vs_none")
                chose = "" if not r.get("auto") else " " + "/".join(sorted({a.get("codec") for a in r["auto"].values()}))
                cells.append(f"{r['latency_s']:.2f}" + ("" if codec == "none" or sp is None else f" ({sp:.2f}x)") + chose)
                if codec == "none" and r.get("comm_share_none") is not None:
                    shares.setdefault(method, []).append(f"{rate} {100 * r['comm_share_none']:.0f} %")
            psnr = "identical" if any_row["identical"] else ("–" if any_row["psnr_db"] is None else f"{any_row['psnr_db']:.1f}")
            lines.append(f"| {method} | {codec} | " + " | ".join(cells) + f" | {_mb(any_row['sent_bytes'])} | "
                         f"{_mb(any_row['raw_bytes'])} | {psnr} |")
    share = "".join(f"\n- {m}: {', '.join(v)}" for m, v in shares.items())
    eff = ["| method | codec | rate | share s | bytes r | bound | speed-up | efficiency |",
           "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    eff += [f"| {r['method']} | {r['codec']} | {r['rate']} | {r['comm_share_none']:.2f} | {r['byte_ratio']:.2f} | "
            f"{r['bound']:.2f}x | {r['speedup_vs_none']:.2f}x | {r['efficiency']:.2f} |"
            for r in rows if r.get("efficiency") is not None]
    errors = sorted({(r["method"], r["error"][:300]) for r in result["rows"] if "error" in r})
    tail = "".join(f"\n- {m} failed: {e}" for m, e in errors)
    how = ("measured: 1 - the unshaped uncompressed latency / the uncompressed latency at the rate"
           if "unshaped" in rates else "estimated: per-rank raw bytes at the link rate / the uncompressed latency")
    return (head + "\n".join(lines) + f"\n\nUncompressed exchange as a share s of the request ({how}):" + share
            + "\n\nEfficiency: measured speed-up / the bound 1 / ((1 - s) + s / r) that the byte ratio r sets at "
            "exchange share s:\n\n" + "\n".join(eff) + ("\n\nFailed launches:" + tail if errors else "") + "\n")


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if "error" not in r]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    rates = result["rates"]
    if not methods:
        return
    # one column per method: latency on top, efficiency (speed-up / byte-ratio bound) below
    fig, axes = plt.subplots(2, len(methods), figsize=(4.2 * len(methods), 6.4), squeeze=False)
    codecs = list(dict.fromkeys(r["codec"] for r in rows))
    for col, method in enumerate(methods):
        top, bottom = axes[0][col], axes[1][col]
        for codec in codecs:
            mine = {r["rate"]: r for r in rows if r["method"] == method and r["codec"] == codec}
            xs = [i for i, rate in enumerate(rates) if rate in mine]
            top.plot(xs, [mine[rates[i]]["latency_s"] for i in xs], marker="o", label=codec)
            eff = [(i, mine[rates[i]]["efficiency"]) for i in xs if mine[rates[i]].get("efficiency") is not None]
            if eff:
                bottom.plot([i for i, _ in eff], [e for _, e in eff], marker="o", label=codec)
        top.set_title(f"{method} ({result['ranks']} ranks)")
        top.set_yscale("log")
        top.set_ylabel("latency per request (s)")
        bottom.axhline(1.0, color="grey", linewidth=0.8)
        bottom.set_ylabel("efficiency (speed-up / bound)")
        for ax in (top, bottom):
            ax.set_xticks(range(len(rates)), rates)
            ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{result['model']} {result['height']}x{result['width']}, {result['steps']} steps: "
                 "latency and efficiency vs link rate")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def run(opts, out_dir: str | None = None) -> dict:
    from compactfusion_xdit.cli import plan

    model = opts.model or bench_methods.default_model()
    if opts.height is None or opts.width is None:
        side = 128 if model == "tiny-flux" else 16
        opts.height, opts.width = opts.height or side, opts.width or side
    rates = [r.strip() for r in opts.rates.split(",") if r.strip()]
    for rate in rates:
        netns.parse_rate(rate)
    chosen = bench_methods.parse_methods(opts.methods, opts.ranks, own_models=True)
    codecs = [c.strip() for c in opts.codecs.split(",") if c.strip()]
    model_path = plan.model_path(model)
    from compactfusion_xdit.codecs import cpu

    if cpu.enabled() and not cpu.ensure_compiled(timeout=900):  # once per machine; ranks then load it
        print(f"bench_network: compiled CPU codecs unavailable ({cpu.status()}); ranks use the torch path",
              file=sys.stderr)
    result = {"ranks": opts.ranks, "model": model, "height": opts.height, "width": opts.width, "steps": opts.steps,
              "requests": opts.requests, "rounds": opts.rounds, "pinned": opts.pin, "rates": rates, "methods": chosen,
              "codecs": codecs,
              "command": shlex.join(["python", "scripts/bench_network.py", *sys.argv[1:]]), "rows": []}
    port = 29600
    with netns.Star(opts.ranks, tag=opts.tag) as star:
        if opts.fail_after_setup:
            raise BenchError("simulated failure after the links were set up (--fail-after-setup)")
        print(f"single-process reference ({model} {opts.height}x{opts.width}, {opts.steps} steps)", flush=True)
        ref = launch([worker_argv(opts, model_path, "none", [])], 1, ["unshaped"], opts.requests, opts.timeout, None,
                     ports.free_port())[0]
        reference = ref["image"]
        phase = ref["phases"][0]
        result["single_latency_s"] = statistics.median(phase["latencies_s"])
        for method in chosen:  # one launch per method, one run per codec
            started = time.monotonic()
            flags = bench_methods.method_flags(method, opts.ranks)
            method_opts, method_path, method_reference = opts, model_path, reference
            if method in bench_methods.OWN_MODELS:  # its own model: its own single-process reference
                own, height, width = bench_methods.OWN_MODELS[method]
                method_opts = argparse.Namespace(**{**vars(opts), "height": height, "width": width})
                method_path = plan.model_path(own)
                method_reference = launch([worker_argv(method_opts, method_path, "none", [])], 1, ["unshaped"],
                                          opts.requests, opts.timeout, None, ports.free_port())[0]["image"]
            runs = [worker_argv(method_opts, method_path, codec, flags) for _ in range(opts.rounds) for codec in codecs]
            try:
                outs = pool_rounds(launch(runs, opts.ranks, rates, opts.requests, opts.timeout * len(runs), star, port,
                                          pin=opts.pin), len(codecs))
                rows = [row for codec, out in zip(codecs, outs)
                        for row in build_rows(method, codec, rates, out, method_reference, opts.ranks)]
            except BenchError as err:
                rows = [{"method": method, "codec": codec, "error": str(err)} for codec in codecs]
            port += len(runs) + 1
            result["rows"] += rows
            print(f"{method} ({time.monotonic() - started:.0f} s):", flush=True)
            for row in rows:
                what = f"{row['rate']:>9s} {row['latency_s']:.2f} s" if "error" not in row else row["error"][:400]
                print(f"  {row['codec']:16s} {what}", flush=True)
            if out_dir:  # what is measured so far survives an interrupted run
                partial = json.loads(json.dumps(result))
                fill_derived(partial["rows"])
                write(partial, out_dir)
    fill_derived(result["rows"])
    return result


def write(result: dict, out_dir: str) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, n) for n in ("bench_network.json", "bench_network.md", "bench_network.png")]
    with open(paths[0], "w") as f:
        json.dump(result, f, indent=1)
    with open(paths[1], "w") as f:
        f.write(markdown(result))
    plot(result, paths[2])
    return paths


def main(argv: list[str] | None = None) -> int:
    opts = parse_options(argv)
    reason = netns.unavailable_reason() if not opts.cleanup or os.geteuid() != 0 else None
    if reason:
        print(f"bench_network: {reason}", file=sys.stderr)
        return 2
    if opts.cleanup:
        found = netns.cleanup_leftovers(opts.tag)
        print(f"bench_network: removed {len(found['namespaces'])} namespaces, {len(found['links'])} links")
        return 0
    rc, result = run_stoppable("bench_network", lambda: run(opts, opts.out), "links removed")
    if rc:
        return rc
    for path in write(result, opts.out):
        print(f"wrote {path}")
    failed = [r for r in result["rows"] if "error" in r]
    if failed:
        print(f"bench_network: {len(failed)} of {len(result['rows'])} runs failed (their rows hold the error)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
