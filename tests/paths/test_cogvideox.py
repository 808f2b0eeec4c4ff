"""CogVideoX through xfuser 0.7.0's ``xFuserCogVideoXPipeline``: Ulysses, ring and CFG parallel, compressed.

tiny-cogvideox at its native settings (32x32, 9 frames -> 3 latent frames of 2x2 tokens, 16 text
tokens, 8 DDIM steps, CFG batch 2 with guidance 5, fp32, seed 42), every run through the worker
(``compactfusion_xdit.rank.worker``). xfuser splits the text and video tokens over the
sequence-parallel ranks (14 per rank) and the attention goes through ``USP``, whose all-to-all and
ring the plugin's patches carry (`patches.ulysses`, `patches.ring_attn`).

* Ulysses 2, ring 2 and CFG 2 uncompressed equal one process within 1e-4 (measured 1.9e-5, 1.1e-5,
  1.1e-5 on latents of magnitude up to 46).
* residual-int4 sends what the payload arithmetic says, with bit-identical caches (``--compression-check``).
* residual-int4 beats plain int4 by a measured margin (PSNR over the uncompressed run's latent range).
"""

from __future__ import annotations

import math

import pytest

from compactfusion_xdit.benchmarks.metrics import range_psnr as psnr
from compactfusion_xdit.testing import free_port, run_ranks

pytestmark = pytest.mark.slow  # ~1.5 min of launches (one 1-rank, one 2-rank); run with -m slow

WORKER_RUNS = "compactfusion_xdit.testing.targets:worker_runs"
TIMEOUT = 600.0
EXACT = 1e-4
STEPS = 8
# The run's shapes: CFG batch 2, 4 heads of 8, 2 layers; (16 text + 3 x 2 x 2 video tokens) / 2 ranks.
BATCH, HEADS, HEAD_DIM, LAYERS, LOCAL_TOKENS = 2, 4, 8, 2, (16 + 12) // 2
# Measured residual-int4 / int4 PSNR vs the uncompressed run: Ulysses 81.3 / 72.8 dB, ring 91.8 / 79.1 dB.
RESIDUAL_GAIN_DB = {"ulysses": 6.0, "ring": 9.0}

BASE = ["--model", "tiny-cogvideox", "--prompt", "a cat", "--seed", "42", "--output_type", "latent",
        "--guidance_scale", "5.0"]
SP = {"ulysses": ["--ulysses_degree", "2"], "ring": ["--ring_degree", "2"]}
RUNS = {
    **{(name, "none"): flags for name, flags in SP.items()},
    ("cfg", "none"): ["--use_cfg_parallel"],
    **{(name, codec): [*flags, "--compression", codec, "--compression-check"]
       for name, flags in SP.items() for codec in ("residual-int4", "int4")},
}


@pytest.fixture(scope="module")
def runs() -> dict:
    """(layout, codec) -> (latents, stats of every rank summed); "single" -> one process's latents."""
    from compactfusion_xdit.models import tiny_seeds

    tiny_seeds.materialize("tiny-cogvideox")
    single = run_ranks(WORKER_RUNS, 1, {"runs": [BASE], "ports": [free_port()]}, timeout=TIMEOUT,
                       init_process_group=False)[0][0][0]
    argvs = [BASE + flags for flags in RUNS.values()]
    out = run_ranks(WORKER_RUNS, 2, {"runs": argvs, "ports": [free_port() for _ in argvs]}, timeout=TIMEOUT,
                    init_process_group=False)[-1]
    return {"single": single, **dict(zip(RUNS, out))}


@pytest.mark.parametrize("layout", ["ulysses", "ring", "cfg"])
def test_uncompressed_parallel_equals_one_process(runs, layout):
    latents, _ = runs[layout, "none"]
    assert latents.shape == runs["single"].shape == (1, 3, 4, 4, 4)
    assert (latents - runs["single"]).abs().max().item() <= EXACT


def int4_wire_nbytes(rows: int, cols: int) -> int:
    """docs/codec_format.md: ceil(C/2) data bytes and a bf16 scale per row."""
    return rows * (-(-cols // 2)) + 2 * rows


@pytest.mark.parametrize("layout", ["ulysses", "ring"])
def test_residual_int4_bytes_follow_the_payload_arithmetic_with_consistent_caches(runs, layout):
    """Compression warm-up 1: step 0 raw, steps 1-7 coded. Ulysses: q, k, v and the output per layer,
    each rank sending the other its half of the heads; ring: k and v per layer, all heads."""
    _, stats = runs[layout, "residual-int4"]
    rows = BATCH * LOCAL_TOKENS * HEADS // (2 if layout == "ulysses" else 1)
    per_step = 2 * LAYERS * (4 if layout == "ulysses" else 2)  # messages of both ranks
    raw, coded = rows * HEAD_DIM * 4, int4_wire_nbytes(rows, HEAD_DIM)
    assert stats["paths"][layout] == {"raw_bytes": STEPS * per_step * raw, "messages": STEPS * per_step,
                                      "sent_bytes": per_step * (raw + (STEPS - 1) * coded)}
    assert stats["cache_consistent"] is True


@pytest.mark.parametrize("layout", ["ulysses", "ring"])
def test_residual_int4_beats_plain_int4_by_the_measured_margin(runs, layout):
    reference = runs[layout, "none"][0]
    residual, plain = runs[layout, "residual-int4"], runs[layout, "int4"]
    assert residual[1]["sent_bytes"] == plain[1]["sent_bytes"]  # the same bytes on the wire
    assert psnr(reference, residual[0]) >= psnr(reference, plain[0]) + RESIDUAL_GAIN_DB[layout]
