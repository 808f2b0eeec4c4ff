"""Parallel mode x codec: fidelity against one process and the mode's bytes, on CPU ranks (gloo).

    python scripts/mode_codec_table.py --model tiny-flux --steps 8 --size 64x64
    python scripts/mode_codec_table.py --modes step-w2,step-w1 --names none,residual-int4

One process computes the single-process latents (no mode, no compression). Then, per mode, one
launch of ``compactfusion_xdit.worker`` ranks loads the pipeline once with the mode's flags and runs
one request per compression name, reinstalling the patches and the mode between them. Prints per
(mode, name): PSNR of the final latents against the single-process latents (peak = max - min of
the reference), the largest absolute difference, and the mode path's bytes summed over ranks
(raw = what the uncompressed exchange would send, sent, ratio). ``--compression-warmup`` is 1.

Rows are the entries of `MODES` (name -> worker flags); a mode adds its rows there.
"""

from __future__ import annotations

import argparse
import os
import sys

#: mode row name -> (the path its traffic is counted under, the worker flags that select it)
MODES: dict[str, tuple[str, list[str]]] = {
    "step-w2": ("step", ["--step_parallel_degree", "2", "--step_parallel_warmup", "2"]),
    "step-w1": ("step", ["--step_parallel_degree", "2", "--step_parallel_warmup", "1"]),
    "patch-sync": ("patch", ["--patch_parallel_degree", "2", "--patch_parallel_mode", "sync"]),
    "patch-displaced-w2": ("patch", ["--patch_parallel_degree", "2", "--patch_parallel_mode", "displaced",
                                     "--warmup_steps", "2"]),
    "patch-displaced-w1": ("patch", ["--patch_parallel_degree", "2", "--patch_parallel_mode", "displaced",
                                     "--warmup_steps", "1"]),
}
NAMES = ["none", "residual-int8", "residual-int4", "int4", "residual-int2", "residual-1bit"]


def single_main(rank: int, world_size: int, argv: list[str]):
    """Rank target (1 rank): the single-process latents."""
    from compactfusion_xdit import worker

    return worker.run_pipeline(worker.parse_args(argv)).output.float()


def mode_main(rank: int, world_size: int, argv: list[str], names: list[str]) -> list:
    """Rank target: per name, (latents on the output rank else None, this rank's per-path stats)."""
    from compactfusion_xdit import modes, patches, worker
    from compactfusion_xdit.config import CompressionConfig

    args = worker.parse_args(argv)  # makes xfuser importable on CPU first
    from xfuser.core.distributed import get_world_group

    loaded = worker.load_pipeline(args)
    output_rank = get_world_group().rank == world_size - 1
    results = []
    for name in names:
        if loaded.mode is not None:
            loaded.mode.uninstall()
        patches.install(CompressionConfig.parse(name, warmup=1))
        session = patches.session()
        loaded.mode = modes.install(loaded.pipe, args, session)
        if session is not None:
            session.state.reset_stats()
        out = worker.call_pipeline(loaded, args)
        stats = session.stats()["paths"] if session is not None else {}
        results.append((out.images.float() if output_rank and out is not None else None, stats))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-flux", help="built-in tiny model name or a local diffusers folder")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--size", default="64x64", help="HEIGHTxWIDTH")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma list of {', '.join(MODES)}")
    parser.add_argument("--names", default=",".join(NAMES), help="comma list of compression names")
    parser.add_argument("--timeout", type=float, default=900)
    opts = parser.parse_args(argv)
    height, width = (int(v) for v in opts.size.lower().split("x"))
    names = [n for n in opts.names.split(",") if n]
    unknown = [m for m in opts.modes.split(",") if m not in MODES]
    if unknown:
        parser.error(f"unknown mode(s) {unknown}; known: {', '.join(MODES)}")

    from compactfusion_xdit import modes as modes_pkg
    from compactfusion_xdit.benchmarks.metrics import range_psnr as psnr
    from compactfusion_xdit.testing import run_ranks

    base = ["--model", opts.model, "--height", str(height), "--width", str(width), "--num_inference_steps",
            str(opts.steps), "--prompt", "a cat", "--max_sequence_length", "16", "--seed", "42", "--output_type", "latent"]
    if "pixart" in opts.model.lower():
        base.append("--no_use_resolution_binning")
    here = os.path.abspath(__file__)
    (ref,) = run_ranks(f"{here}:single_main", 1, {"argv": base}, timeout=opts.timeout, init_process_group=False)
    print(f"model {opts.model}, {height}x{width}, {opts.steps} steps, compression warm-up 1; "
          f"PSNR of latents vs one process (peak = max - min of the reference); bytes of the mode's path, all ranks")
    print(f"{'mode':16} {'compression':14} {'PSNR dB':>8} {'max|diff|':>10} {'raw bytes':>11} {'sent bytes':>11} "
          f"{'ratio':>7}")
    for mode in opts.modes.split(","):
        path, flags = MODES[mode]
        argv_mode = base + flags
        ranks = modes_pkg.layout.total_degree(_namespace(flags))
        per_rank = run_ranks(f"{here}:mode_main", ranks, {"argv": argv_mode, "names": names}, timeout=opts.timeout,
                             init_process_group=False)
        for i, name in enumerate(names):
            latents = per_rank[-1][i][0]
            raw = sum(r[i][1].get(path, {}).get("raw_bytes", 0) for r in per_rank)
            sent = sum(r[i][1].get(path, {}).get("sent_bytes", 0) for r in per_rank)
            diff = (latents - ref).abs().max().item()
            ratio = f"{raw / sent:6.2f}x" if sent else "      -"
            print(f"{mode:16} {name:14} {psnr(ref, latents):8.2f} {diff:10.2e} {raw:11d} {sent:11d} {ratio}")
    return 0


def _namespace(flags: list[str]) -> argparse.Namespace:
    """The degree flags of a mode row as the attributes `modes.layout` reads."""
    ns = argparse.Namespace()
    for flag, value in zip(flags[::2], flags[1::2]):
        setattr(ns, flag.lstrip("-"), int(value) if value.isdigit() else value)
    return ns


if __name__ == "__main__":
    sys.exit(main())
