"""Image fidelity metrics: PSNR and SSIM through ``skimage.metrics``, with this project's conventions.

    psnr(ref, img)            # dB; inf when identical; uint8 images use peak 255, floats peak 1
    range_psnr(ref, x)        # dB over the reference's value range (latents, activations)
    snr(ref, x)               # dB of signal over error energy (audio waveforms)
    ssim(ref, img)            # mean SSIM over channels, in [-1, 1]

The peak (``data_range``) is always passed explicitly: 255 for uint8, 1 for float images, and the
reference's ``max - min`` for `range_psnr`. SSIM is Wang et al. (2004) with skimage's Gaussian
weights (sigma 1.5, an 11-tap window, K1 0.01, K2 0.03, sample covariance), computed per channel
over the windows that lie inside the image and averaged. An image shorter than 11 pixels on a side
gets the widest Gaussian window that fits (sigma shrunk so that skimage's 3.5-sigma window does).
Needs scikit-image (the ``bench`` and ``test`` extras).
"""

from __future__ import annotations

import math

import numpy as np
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

#: skimage's Gaussian SSIM window spans ``2 * int(TRUNCATE * sigma + 0.5) + 1`` pixels.
_SKIMAGE_TRUNCATE = 3.5


def _as_image(image) -> tuple[np.ndarray, float]:
    """HxWxC float64 array and its peak (255 for uint8 input, 1 otherwise)."""
    array = np.asarray(image)
    peak = 255.0 if array.dtype == np.uint8 else 1.0
    array = array.astype(np.float64)
    if array.ndim == 2:
        array = array[..., None]
    return array, peak


def _psnr(reference: np.ndarray, x: np.ndarray, peak: float) -> float:
    if reference.shape != x.shape:
        raise ValueError(f"shapes differ: {reference.shape} vs {x.shape}")
    if np.array_equal(reference, x):
        return math.inf  # skimage divides by a zero error (inf plus a RuntimeWarning)
    return float(peak_signal_noise_ratio(reference, x, data_range=peak))


def psnr(reference, image) -> float:
    """Peak signal-to-noise ratio of `image` against `reference` in dB (inf when equal)."""
    ref, peak = _as_image(reference)
    img, _ = _as_image(image)
    return _psnr(ref, img, peak)


def range_psnr(reference, x) -> float:
    """PSNR of `x` against `reference` with peak = the reference's value range (max - min), in dB;
    inf when equal. For latents and activations, which have no fixed peak. Takes tensors or arrays."""
    ref = np.asarray(reference, dtype=np.float64)
    arr = np.asarray(x, dtype=np.float64)
    return _psnr(ref, arr, float(ref.max() - ref.min()))


def snr(reference, x) -> float:
    """Signal-to-noise ratio of `x` against `reference` in dB: ``10 log10(sum ref^2 / sum (x - ref)^2)``;
    inf when equal. For waveforms, whose peak says little about loudness. Takes tensors or arrays."""
    ref = np.asarray(reference, dtype=np.float64)
    arr = np.asarray(x, dtype=np.float64)
    if ref.shape != arr.shape:
        raise ValueError(f"shapes differ: {ref.shape} vs {arr.shape}")
    error = float(np.sum((arr - ref) ** 2))
    return math.inf if error == 0.0 else 10.0 * math.log10(float(np.sum(ref ** 2)) / error)


def ssim(reference, image, window: int = 11, sigma: float = 1.5) -> float:
    """Mean structural similarity of `image` against `reference` (channels averaged).

    `window` must be the Gaussian's span (11 for sigma 1.5; skimage derives it from sigma). Images
    smaller than the window use the largest odd window that fits, with sigma shrunk to match."""
    ref, peak = _as_image(reference)
    img, _ = _as_image(image)
    if ref.shape != img.shape:
        raise ValueError(f"image shapes differ: {ref.shape} vs {img.shape}")
    side = min(ref.shape[0], ref.shape[1])
    if side < window:
        window = side if side % 2 else side - 1
        sigma = min(sigma, ((window - 1) // 2) / _SKIMAGE_TRUNCATE)
    if window < 3:
        raise ValueError(f"images of {ref.shape[0]}x{ref.shape[1]} pixels are too small for SSIM (3x3 at least)")
    return float(structural_similarity(ref, img, data_range=peak, channel_axis=-1, gaussian_weights=True,
                                       sigma=sigma, use_sample_covariance=True, K1=0.01, K2=0.03))


def finite_or_none(value: float) -> float | None:
    """JSON has no inf: identical images are stored as null (and shown as 'identical')."""
    return None if value is None or not math.isfinite(value) else value


def fmt_db(value: float | None) -> str:
    return "identical" if value is None or (isinstance(value, float) and math.isinf(value)) else f"{value:.1f}"
