"""digits-flux, the trained built-in (scripts/train_tiny_model.py): it loads and draws digits.

Samples: prompts "digit 0" .. "digit 9", 16x16, 20 steps, seed 0..9. A sample counts as a digit
when a 1-nearest-neighbour classifier over scikit-learn's 1797 digits (the sample averaged down to
8x8) gives its prompt's digit.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F

from compactfusion_xdit.models import digits, tiny

STEPS = 20
# Measured (docs/digits_flux.md): 9 of 10 classified right at text length 16 and at 128, 85 of
# 100 over 10 more seeds per digit. The assertions keep a margin below. Codec fidelity on this
# model is tested with each path (test_ulysses_compression, test_ring_compression,
# test_pipefusion_compression).
MIN_CORRECT = 8                 # of 10 samples classified as their prompt's digit
MIN_CORRECT_OF_100 = 75


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


def test_most_of_a_hundred_samples_are_their_prompts_digit(pipe):
    correct = 0
    for row in range(10):  # seeds 100 * row + digit, apart from the seeds 0-9 above
        out = pipe([digits.prompt(d) for d in range(10)], height=digits.SIZE, width=digits.SIZE, num_inference_steps=STEPS,
                   max_sequence_length=16, output_type="pt",
                   generator=[torch.Generator().manual_seed(100 * row + d) for d in range(10)])
        labels = nearest_digit(out.images.float().mean(dim=1) * 2 - 1)
        correct += sum(label == d for d, label in enumerate(labels))
    assert correct >= MIN_CORRECT_OF_100, correct
