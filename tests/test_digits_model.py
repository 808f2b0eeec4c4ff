"""digits-flux, the trained built-in (scripts/train_tiny_model.py): it loads, draws digits, and its
sharp attention makes the codecs' fidelity differ (which the random tiny models cannot show).

Samples: prompts "digit 0" .. "digit 9", 16x16, 20 steps, seed 0..9. A sample counts as a digit
when a 1-nearest-neighbour classifier over scikit-learn's 1797 digits (the sample averaged down to
8x8) gives its prompt's digit.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from compactfusion_xdit.models import digits, tiny
from compactfusion_xdit.testing import run_ranks

HERE = os.path.abspath(__file__)
STEPS = 20
TIMEOUT = 240.0
# Measured (docs/digits_flux.md): 7 of 10 classified right at text length 16 and at 128; Ulysses 2
# residual-int4 67.8 dB, plain int4 37.8 dB. Assertions keep a margin below.
MIN_CORRECT = 6                 # of 10 samples classified as their prompt's digit
ULYSSES_RESIDUAL_INT4_MIN_DB = 60.0
ULYSSES_PLAIN_GAP_DB = 20.0


def nearest_digit(images: torch.Tensor) -> list[int]:
    """(N, 16, 16) grey images in [-1, 1] (ink -1) -> the label of the nearest sklearn digit."""
    from sklearn.datasets import load_digits

    data = load_digits()
    ink = (1 - F.avg_pool2d(images.unsqueeze(1).double(), 2).reshape(len(images), 64)) * 8  # sklearn's 0..16
    nearest = torch.cdist(ink, torch.tensor(data.data, dtype=torch.float64)).argmin(dim=1)
    return [int(data.target[i]) for i in nearest]


@pytest.fixture(scope="module")
def pipe():
    p = tiny.build_pipeline(digits.NAME)
    p.set_progress_bar_config(disable=True)
    return p


def draw(pipe, max_sequence_length: int) -> torch.Tensor:
    """Digits 0-9 through the pipeline's normal (decoded) output: (10, 16, 16) grey in [-1, 1]."""
    out = pipe([digits.prompt(d) for d in range(10)], height=digits.SIZE, width=digits.SIZE, num_inference_steps=STEPS,
               max_sequence_length=max_sequence_length, output_type="pt",
               generator=[torch.Generator().manual_seed(d) for d in range(10)])
    rgb = out.images.float()
    assert rgb.shape == (10, 3, digits.SIZE, digits.SIZE)
    return rgb.mean(dim=1) * 2 - 1


@pytest.fixture(scope="module")
def samples(pipe) -> torch.Tensor:
    return draw(pipe, max_sequence_length=16)


def test_digits_flux_is_a_shipped_builtin_with_its_training_record():
    assert digits.NAME in tiny.BUILTIN_MODELS
    path = tiny.materialize(digits.NAME)
    assert path == digits.folder() and tiny.is_materialized(digits.NAME)
    with open(os.path.join(path, "training_config.json")) as f:
        record = json.load(f)
    assert {"seed", "steps", "batch_size", "lr"} <= set(record["settings"]) and record["cpu_seconds"] > 0
    with open(os.path.join(path, "transformer", "config.json")) as f:
        config = json.load(f)
    assert config["num_attention_heads"] % 4 == 0  # Ulysses 2 and 4
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
    assert size < 5 * 2**20


def test_the_vae_maps_latents_to_the_same_grey_pixels(pipe):
    z = torch.rand(2, 1, 16, 16) * 2 - 1
    with torch.no_grad():
        rgb = pipe.vae.decode(z).sample
        back = pipe.vae.encode(rgb).latent_dist.mean
    assert (rgb - z).abs().max() < 1e-4
    assert (back - z).abs().max() < 1e-4


def test_samples_look_like_the_prompted_digits(samples):
    labels = nearest_digit(samples)
    assert sum(label == d for d, label in enumerate(labels)) >= MIN_CORRECT, labels


def test_samples_of_two_digits_differ(samples):
    assert (samples[1] - samples[7]).abs().mean() > 0.2


def test_a_long_text_length_draws_the_same_digits(pipe, samples):
    # every text token is the same constant, and training covered 1..512 of them
    long = draw(pipe, max_sequence_length=128)
    labels = nearest_digit(long)
    assert sum(label == d for d, label in enumerate(labels)) >= MIN_CORRECT, labels


# --------------------------------------------------------------------------------------------
# Ulysses 2 through xfuser: residual-int4 vs plain int4
# --------------------------------------------------------------------------------------------


def psnr(ref: torch.Tensor, x: torch.Tensor) -> float:
    mse = ((ref.double() - x.double()) ** 2).mean().item()
    peak = (ref.max() - ref.min()).item()
    return math.inf if mse == 0 else 10 * math.log10(peak * peak / mse)


def ulysses_requests(rank: int, world_size: int, argv: list[str], names: list[str]):
    """Load once; one request per compression name; the output rank returns the latents."""
    from compactfusion_xdit import patches, worker
    from compactfusion_xdit.config import CompressionConfig

    args = worker.parse_args(argv)
    loaded = worker.load_pipeline(args)
    latents = {}
    for name in names:
        patches.install(CompressionConfig.parse(name, warmup=1))
        out = worker.call_pipeline(loaded, args)
        latents[name] = out.images.float() if rank == world_size - 1 else None
    return latents


@pytest.fixture(scope="module")
def ulysses_latents():
    argv = ["--model", digits.NAME, "--height", "16", "--width", "16", "--num_inference_steps", str(STEPS),
            "--prompt", digits.prompt(3), "--max_sequence_length", "16", "--seed", "3", "--output_type", "latent",
            "--ulysses_degree", "2"]
    per_rank = run_ranks(f"{HERE}:ulysses_requests", 2, {"argv": argv, "names": ["none", "residual-int4", "int4"]},
                         timeout=TIMEOUT, init_process_group=False)
    return per_rank[1]


def test_residual_int4_is_clearly_closer_than_plain_int4_on_ulysses(ulysses_latents):
    ref = ulysses_latents["none"]
    residual_db = psnr(ref, ulysses_latents["residual-int4"])
    plain_db = psnr(ref, ulysses_latents["int4"])
    assert residual_db >= ULYSSES_RESIDUAL_INT4_MIN_DB, (residual_db, plain_db)
    assert residual_db - plain_db >= ULYSSES_PLAIN_GAP_DB, (residual_db, plain_db)
