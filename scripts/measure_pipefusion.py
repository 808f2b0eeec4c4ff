"""PipeFusion 2 (2 patches) on tiny-flux over gloo: PSNR of the final latents against uncompressed
PipeFusion and the byte ratio of the "pipefusion" path, per compression.

    OMP_NUM_THREADS=1 python scripts/measure_pipefusion.py [--size 64x64] [--steps 6] \\
        [--compressions residual-int8,residual-int4,residual-int2,residual-1bit,int4]

Byte ratio = raw / sent bytes over both ranks for the whole request (synchronous warm-up step and
the seeding messages included); "coded" = raw / sent bytes of the coded messages only.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
TARGET = os.path.join(os.path.dirname(HERE), "tests", "test_pipefusion_compression.py")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="64x64", help="HxW")
    parser.add_argument("--compressions", default="residual-int8,residual-int4,residual-int2,residual-1bit,int4")
    parser.add_argument("--timeout", type=float, default=400.0)
    args = parser.parse_args(argv)
    import importlib.util

    spec = importlib.util.spec_from_file_location("pipefusion_compression_targets", TARGET)
    targets = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(targets)
    from compactfusion_xdit.testing import run_ranks

    size = tuple(int(v) for v in args.size.lower().split("x"))
    compressions = [c for c in args.compressions.split(",") if c]
    variants = [("none", size)] + [(c, size) for c in compressions]
    per_rank = run_ranks(f"{TARGET}:runs_in_turn", 2, {"model": "tiny-flux", "variants": variants},
                         timeout=args.timeout, init_process_group=False)
    ref = per_rank[-1][0]["latents"]
    print(f"tiny-flux {size[0]}x{size[1]}, {targets.STEPS} steps, PipeFusion 2, {targets.PATCHES} patches, "
          f"warmup_steps {targets.WARMUP_STEPS}, compression warm-up 1")
    print(f"{'compression':16s} {'PSNR dB':>8s} {'raw B':>9s} {'sent B':>9s} {'ratio':>7s} {'coded':>7s}")
    for i, (name, _) in enumerate(variants[1:], start=1):
        runs = [r[i] for r in per_rank]
        raw = sum(r["stats"]["raw_bytes"] for r in runs)
        sent = sum(r["stats"]["sent_bytes"] for r in runs)
        coded = [m for r in runs for m in r["messages"] if m[0] == "send" and m[4] == "coded"]
        coded_raw = sum(4 * math.prod(m[2]) for m in coded)
        coded_sent = coded_raw and sum(r["stats"]["sent_bytes"] for r in runs) - sum(
            4 * math.prod(m[2]) for r in runs for m in r["messages"] if m[0] == "send" and m[4] != "coded")
        mism = sum(len(r["mismatches"]) for r in runs)
        print(f"{name:16s} {targets.psnr(runs[-1]['latents'], ref):8.2f} {raw:9d} {sent:9d} {raw / sent:6.2f}x "
              f"{coded_raw / coded_sent if coded_sent else float('nan'):6.2f}x" + (f"  CACHE MISMATCHES {mism}" if mism else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
