"""digits-flux: a small Flux pipeline trained on scikit-learn's 8x8 digits, shipped with the package.

    from compactfusion_xdit.models import digits
    pipe = digits.load_pipeline()
    pipe(digits.prompt(7), height=16, width=16, num_inference_steps=20).images[0]   # a 16x16 "7"

or ``xfuser --model digits-flux --height 16 --width 16 --prompt "digit 7" ...``. Unlike the random
tiny models its attention is sharp, so compression error shows in the output: use it for fidelity.

Setup (scripts/train_tiny_model.py trains it; docs/digits_flux.md has settings and figures):
- Pixel space. The latent is the 16x16 grey image itself (1 channel, -1 ink .. +1 paper; the 8x8
  digits upsampled 2x); Flux packs it 2x2 into 64 tokens of 4 values. The VAE has one block level
  (scale factor 1) and hand-set weights whose decoder maps a latent to the RGB image of the same grey
  values (exact up to float rounding) and whose encoder maps back; it was not trained.
- The prompt ("digit 7") reaches the transformer as CLIP's pooled embedding (the adaLN vector). The
  T5 encoder outputs zeros, so every text token is the same constant and any --max_sequence_length
  works (training covered 1..512 text tokens).
- Sample at 16x16 (the training size) with about 20 steps.
"""

from __future__ import annotations

import os

import torch

NAME = "digits-flux"
#: Image side the model was trained at (pixels; latents are the same size).
SIZE = 16


def folder() -> str:
    """The shipped diffusers folder (inside the installed package)."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights", NAME)


def is_available() -> bool:
    return os.path.isfile(os.path.join(folder(), "model_index.json"))


def prompt(digit: int) -> str:
    """The prompt the model was trained on for `digit` (0-9)."""
    if not 0 <= int(digit) <= 9:
        raise ValueError(f"digit must be 0-9, got {digit!r}")
    return f"digit {int(digit)}"


def load_pipeline(dtype: torch.dtype = torch.float32, path: str | None = None):
    """The diffusers FluxPipeline of the shipped folder (or `path`), in `dtype`."""
    from diffusers import FluxPipeline

    path = path or folder()
    if not os.path.isfile(os.path.join(path, "model_index.json")):
        raise FileNotFoundError(f"{NAME} weights not found in {path}; reinstall the package or run "
                                "scripts/train_tiny_model.py to train them")
    return FluxPipeline.from_pretrained(path, torch_dtype=dtype)
