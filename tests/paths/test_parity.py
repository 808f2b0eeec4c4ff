"""Real xfuser 0.7.0 on CPU ranks (gloo) gives the single-process result with ``--compression none``.

Every run goes through ``compactfusion_xdit.rank.worker`` (patches installed, xfuser configs built from
the shared flags) on the built-in tiny models (`compactfusion_xdit.models.tiny`), 64x64, 3 steps,
fp32, seed 42. Each parallel layout is compared with one process of the same model by the largest
absolute difference of the final latents. Exact layouts (Ulysses, ring, both, CFG, PipeFusion with every step synchronous) must
agree to fp32 round-off; PipeFusion with fewer synchronous warm-up steps uses one-step-stale
activations by design, so it must differ, but within a measured bound.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from compactfusion_xdit.testing import rank_env, run_ranks

HERE = os.path.abspath(__file__)
WORKER_LATENTS = "compactfusion_xdit.testing.targets:worker_latents"
WORKER_LATENTS_IN_TURN = "compactfusion_xdit.testing.targets:worker_latents_in_turn"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
STEPS = 3
EXACT = 1e-4  # fp32: measured 4.8e-7 (tiny-flux, |latents| <= 4.2) for every exact Flux layout
TIMEOUT = 150.0


# --------------------------------------------------------------------------------------------
# Tiny models: the built-ins
# --------------------------------------------------------------------------------------------


def builtin(name: str) -> str:
    """The model name, materialised here first so that the ranks find it cached."""
    from compactfusion_xdit.models import tiny

    tiny.materialize(name)
    return name


@pytest.fixture(scope="module")
def flux():
    return builtin("tiny-flux")


@pytest.fixture(scope="module")
def sd3():
    return builtin("tiny-sd3")


@pytest.fixture(scope="module")
def pixart():
    return builtin("tiny-pixart")


# --------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------



def base_argv(model: str) -> list[str]:
    argv = ["--model", model, "--height", "64", "--width", "64", "--num_inference_steps", str(STEPS),
            "--prompt", "a cat", "--max_sequence_length", "16", "--seed", "42", "--output_type", "latent",
            "--compression", "none"]
    return argv + ["--no_use_resolution_binning"] if "pixart" in model else argv


def latents(model: str, world_size: int, flags: list[str] = ()) -> torch.Tensor:
    out = run_ranks(WORKER_LATENTS, world_size, {"argv": base_argv(model) + list(flags)},
                    timeout=TIMEOUT, init_process_group=False)
    assert all(o is None for o in out[:-1])
    return out[-1]



@pytest.fixture(scope="module")
def single(flux, sd3, pixart) -> dict[str, torch.Tensor]:
    """One-process latents of every model, computed in one process."""
    models = {"flux": flux, "sd3": sd3, "pixart": pixart}
    (outs,) = run_ranks(WORKER_LATENTS_IN_TURN, 1, {"argvs": [base_argv(m) for m in models.values()]},
                        timeout=TIMEOUT, init_process_group=False)
    return dict(zip(models, outs))


@pytest.fixture(scope="module")
def flux_single(single):
    return single["flux"]


@pytest.fixture(scope="module")
def sd3_single(single):
    return single["sd3"]


@pytest.fixture(scope="module")
def pixart_single(single):
    return single["pixart"]


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape and a.dtype == b.dtype == torch.float32
    return (a - b).abs().max().item()


# --------------------------------------------------------------------------------------------
# Exact layouts
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "world_size,flags",
    [
        (2, ["--ulysses_degree", "2"]),
        (2, ["--ring_degree", "2"]),
        # CI time: Ulysses x ring is in test_ring_compression.py, PipeFusion in test_pipefusion_compression.py
        pytest.param(4, ["--ulysses_degree", "2", "--ring_degree", "2"], marks=pytest.mark.slow),
        pytest.param(2, ["--pipefusion_parallel_degree", "2", "--num_pipeline_patch", "2", "--warmup_steps", str(STEPS)],
                     marks=pytest.mark.slow),
    ],
    ids=["ulysses2", "ring2", "ulysses2xring2", "pipefusion2-all-warmup"],
)
def test_flux_parallel_equals_single_process(flux, flux_single, world_size, flags):
    assert max_abs_diff(latents(flux, world_size, flags), flux_single) <= EXACT


def test_sd3_cfg2_equals_single_process(sd3, sd3_single):
    # Flux has no CFG branch (xfuser refuses cfg > 1 for it); SD3 splits positive/negative.
    assert max_abs_diff(latents(sd3, 2, ["--use_cfg_parallel"]), sd3_single) <= EXACT  # measured 1.4e-6


def test_pixart_ulysses2_equals_single_process(pixart, pixart_single):
    # PixArt's DPM-Solver latents reach |x| ~ 8e2 with random weights, so fp32 round-off is
    # bounded relative to their scale (measured 0.0 with |latents| <= 7.7e2).
    scale = max(1.0, pixart_single.abs().max().item())
    assert max_abs_diff(latents(pixart, 2, ["--ulysses_degree", "2"]), pixart_single) <= EXACT * scale


# --------------------------------------------------------------------------------------------
# PipeFusion with stale activations
# --------------------------------------------------------------------------------------------


@pytest.mark.slow  # CI time; PipeFusion closeness is in test_pipefusion_compression.py
def test_flux_pipefusion2_one_warmup_step_is_close_but_not_exact(flux, flux_single):
    # 1 synchronous step, then 2 asynchronous steps over 2 patches: each patch attends to the
    # other patch's K/V from the previous step. Measured max |diff| 4.7e-3 with |latents| <= 4.2
    # (tiny-flux 2+2 blocks, 64x64, 3 steps; 2.7e-3 with a 1+1-block Flux); the bound leaves room
    # for other tiny weights.
    out = latents(flux, 2, ["--pipefusion_parallel_degree", "2", "--num_pipeline_patch", "2", "--warmup_steps", "1"])
    diff = max_abs_diff(out, flux_single)
    scale = max(1.0, flux_single.abs().max().item())
    assert 1e-5 < diff <= 5e-3 * scale


# --------------------------------------------------------------------------------------------
# The worker as a command
# --------------------------------------------------------------------------------------------


def worker_main(rank: int, world_size: int, argv: list[str]) -> int:
    from compactfusion_xdit.rank import worker

    return worker.main(argv)


def test_worker_command_writes_latents_and_stats_on_last_rank(flux, flux_single, tmp_path):
    out_dir = str(tmp_path / "out")
    argv = base_argv(flux) + ["--ulysses_degree", "2", "--output_dir", out_dir]
    assert run_ranks(f"{HERE}:worker_main", 2, {"argv": argv}, timeout=TIMEOUT, init_process_group=False) == [0, 0]
    saved = torch.from_numpy(np.load(os.path.join(out_dir, "latents.npy")))
    assert max_abs_diff(saved, flux_single) <= EXACT
    with open(os.path.join(out_dir, "stats.json")) as f:
        stats = json.load(f)
    assert stats["world_size"] == 2 and stats["compression"] == "none" and stats["elapsed_s"] > 0
    assert stats["parallel"]["ulysses"] == 2 and stats["parallel"]["ring"] == 1 and stats["parallel"]["pipefusion"] == 1


def test_worker_command_writes_png_and_stats(flux, tmp_path):
    from PIL import Image

    out_dir = str(tmp_path / "out")
    argv = [a if a != "latent" else "pil" for a in base_argv(flux)] + ["--output_dir", out_dir]
    assert run_ranks(f"{HERE}:worker_main", 1, {"argv": argv}, timeout=TIMEOUT, init_process_group=False) == [0]
    with Image.open(os.path.join(out_dir, "image_0.png")) as image:
        assert image.size == (64, 64)
    with open(os.path.join(out_dir, "stats.json")) as f:
        assert json.load(f)["outputs"] == ["image_0.png"]


def test_worker_rejects_heads_not_divisible_by_ulysses_degree(flux):
    import subprocess
    import sys

    env = rank_env(0, 3, port=1)  # checked before any process group is built
    argv = base_argv(flux) + ["--ulysses_degree", "3"]
    proc = subprocess.run([sys.executable, "-m", "compactfusion_xdit.rank.worker", *argv], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "not divisible by --ulysses_degree 3" in last
