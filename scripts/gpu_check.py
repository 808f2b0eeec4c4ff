"""One command for whoever has a GPU: the checks that need one, in about five minutes, as JSON.

    python scripts/gpu_check.py --out gpu_check_out        # or: bash scripts/gpu_check.sh

1. the fused-kernel tests (tests/codecs/test_fused_kernels.py: Triton against the torch reference);
2. a coded all-to-all between two processes on one GPU over gloo under
   ``torch.cuda.set_sync_debug_mode("error")``: which steps make the host wait, next to stock
   ``all_to_all_single`` (`compactfusion_xdit.benchmarks.gpu_checks`);
3. the codecs' µs per call next to one Flux block's compute at 4096 tokens (scripts/project_gpu.py
   --device cuda).

Writes ``gpu_check.json`` (every step's status, output tail and figures) under ``--out``. Without
a CUDA device it says so and exits 2: nothing here is measured on a CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(cmd: list[str], timeout: float) -> dict:
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        status, tail = proc.returncode, (proc.stdout + proc.stderr)[-3000:]
    except subprocess.TimeoutExpired as err:
        status, tail = "timeout", str(err)[-3000:]
    return {"command": " ".join(cmd), "status": status, "seconds": round(time.monotonic() - start, 1), "tail": tail}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="gpu_check_out")
    p.add_argument("--codec", default="residual-int4", help="codec of the sync check (default residual-int4)")
    opts = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA device: gpu_check measures on a GPU only (nothing was run)"}))
        return 2
    os.makedirs(opts.out, exist_ok=True)
    report: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    report["fused_kernel_tests"] = _run([sys.executable, "-m", "pytest", "-q", "tests/codecs/test_fused_kernels.py"], 240)

    from compactfusion_xdit.testing import RankFailure, run_ranks

    try:
        steps = run_ranks("compactfusion_xdit.benchmarks.gpu_checks:sync_free_exchange", 2,
                          {"device": "cuda", "codec": opts.codec}, timeout=180)[0]
        coded = [s for s in steps if s["kind"] == "CODED"]
        report["sync_check"] = {"codec": opts.codec, "steps": steps,
                                "coded_steps_sync_free": bool(coded) and all(s["compressed_sync"] is None for s in coded)}
    except RankFailure as err:
        report["sync_check"] = {"codec": opts.codec, "error": str(err)[-3000:]}
    project = os.path.join(opts.out, "project_gpu")
    report["codec_vs_block"] = _run([sys.executable, "scripts/project_gpu.py", "--device", "cuda", "--out", project], 240)
    path = os.path.join(opts.out, "gpu_check.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps({k: (v if not isinstance(v, dict) else {x: v[x] for x in v if x != "tail"}) for k, v in report.items()},
                     indent=1)[:6000])
    print(f"wrote {path}")
    failed = report["fused_kernel_tests"]["status"] != 0 or "error" in report["sync_check"] \
        or report["codec_vs_block"]["status"] != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
