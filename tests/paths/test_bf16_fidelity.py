"""bf16 fidelity of residual-int4 on the trained digits-flux: Ulysses 2, ring 2, PipeFusion 2.

The path tests assert fidelity in float32; GPU users run bf16 (the worker's default on CUDA). Here
every run is ``--dtype bfloat16`` on CPU ranks over gloo, through ``compactfusion_xdit.rank.worker``:
"digit 3", seed 42, 16x16, 20 steps, text length 16, compression warm-up 1 (step 0 raw). Each
compressed run is compared with the uncompressed bf16 run of the same layout by the PSNR of the
final latents (peak = the reference's max - min). One launch of 2 ranks runs all nine requests in
turn (3 layouts x none / residual-int4 / plain int4, each on its own master port): the xfuser
import dominates a launch.

Besides the PSNR, each coded run must show that it was coded and carried bf16: every message on
its path, raw/sent between 2.5 and 4 (int4 of a 2-byte element plus per-row bf16 scales can send
at most 4x less; measured 3.06 / 3.06 / 2.93, where fp32 gives 5.30 / 5.30 / 4.53), caches
consistent (``--compression-check``), and residual-int4 clearly ahead of plain int4.
"""

from __future__ import annotations

import pytest
import torch

from compactfusion_xdit.benchmarks.metrics import range_psnr as psnr
from compactfusion_xdit.models import digits
from compactfusion_xdit.testing import free_port, run_ranks

WORKER_RUNS = "compactfusion_xdit.testing.targets:worker_runs"
TIMEOUT = 240.0
STEPS = 20
SEED = 42
LAYOUTS = {
    "ulysses": ["--ulysses_degree", "2"],
    "ring": ["--ring_degree", "2"],
    "pipefusion": ["--pipefusion_parallel_degree", "2", "--num_pipeline_patch", "2", "--warmup_steps", "1"],
}
COMPRESSIONS = {
    "none": [],
    "residual-int4": ["--compression-check"],
    "int4": [],
}
# Measured on the shipped weights (bf16 against bf16, same layout), with
#   python scripts/bench_fidelity.py --path METHOD --ranks 2 --codecs none,residual-int4,plain-int4 \
#       --prompts "digit 3" --seeds 42 --against uncompressed --only-path --extra="--dtype bfloat16"
# (METHOD = ulysses, ring, pipefusion; this file's launch gives the same numbers):
#   Ulysses 2:                  residual-int4 56.5 dB, plain int4 41.7 dB (gap 14.7)
#   ring 2:                     residual-int4 57.9 dB, plain int4 48.5 dB (gap 9.4)
#   PipeFusion 2 (2 patches):   residual-int4 52.2 dB, plain int4 34.6 dB (gap 17.6)
# For scale: fp32 residual-int4 gives 64.2 / 75.3 / 53.2 dB at the same settings, and the
# uncompressed bf16 run itself is 53.7 / 54.4 / 54.5 dB from the uncompressed fp32 one.
# Asserted about 4 dB under the measurements (the gaps about 3.5 dB under).
MIN_DB = {"ulysses": 52.0, "ring": 54.0, "pipefusion": 48.0}
MIN_GAP_DB = {"ulysses": 11.0, "ring": 6.0, "pipefusion": 14.0}
RATIO = (2.5, 4.0)


def argv_for(path: str, compression: str) -> list[str]:
    return ["--model", digits.NAME, "--height", str(digits.SIZE), "--width", str(digits.SIZE),
            "--num_inference_steps", str(STEPS), "--prompt", digits.prompt(3), "--max_sequence_length", "16",
            "--seed", str(SEED), "--output_type", "latent", "--dtype", "bfloat16", *LAYOUTS[path],
            "--compression", compression, *COMPRESSIONS[compression]]


@pytest.fixture(scope="module")
def bf16_runs() -> dict[tuple[str, str], tuple[torch.Tensor, dict]]:
    """(path, compression) -> (the output rank's final latents as float32, its stats)."""
    names = [(path, c) for path in LAYOUTS for c in COMPRESSIONS]
    argvs = [argv_for(*name) for name in names]
    outs = run_ranks(WORKER_RUNS, 2, {"runs": argvs, "ports": [free_port() for _ in names]},
                     timeout=TIMEOUT, init_process_group=False)
    assert all(latents is None for latents, _ in outs[0])  # rank 1 is the output rank
    return dict(zip(names, outs[-1]))


@pytest.mark.parametrize("path", list(LAYOUTS))
def test_runs_are_bf16_and_the_uncompressed_run_sends_raw(bf16_runs, path):
    for compression in COMPRESSIONS:
        latents, stats = bf16_runs[(path, compression)]
        assert stats["dtype"] == "bfloat16" and stats["compression"] == compression
        assert latents.shape == (1, (digits.SIZE // 2) ** 2, 4) and torch.isfinite(latents).all()
    ref = bf16_runs[(path, "none")][1]["paths"][path]
    assert ref["raw_bytes"] == ref["sent_bytes"] > 0


@pytest.mark.parametrize("path", list(LAYOUTS))
def test_residual_int4_bf16_stays_close_to_uncompressed_bf16(bf16_runs, path):
    ref = bf16_runs[(path, "none")][0]
    latents, stats = bf16_runs[(path, "residual-int4")]
    # actually coded: only this path, the same traffic as the uncompressed run, int4 sizes of bf16
    assert set(stats["paths"]) == {path}
    coded, raw = stats["paths"][path], bf16_runs[(path, "none")][1]["paths"][path]
    assert coded["messages"] == raw["messages"] > 0 and coded["raw_bytes"] == raw["raw_bytes"]
    assert RATIO[0] < coded["raw_bytes"] / coded["sent_bytes"] < RATIO[1], coded
    assert stats["cache_consistent"] is True
    assert not torch.equal(latents, ref)
    db = psnr(ref, latents)
    assert db >= MIN_DB[path], (path, db)


@pytest.mark.parametrize("path", list(LAYOUTS))
def test_residual_int4_bf16_clearly_beats_plain_int4(bf16_runs, path):
    ref = bf16_runs[(path, "none")][0]
    resid = psnr(ref, bf16_runs[(path, "residual-int4")][0])
    plain_latents, plain_stats = bf16_runs[(path, "int4")]
    s = plain_stats["paths"][path]
    assert RATIO[0] < s["raw_bytes"] / s["sent_bytes"] < RATIO[1], s   # the same bytes as residual-int4
    plain = psnr(ref, plain_latents)
    assert resid - plain >= MIN_GAP_DB[path], (path, resid, plain)
