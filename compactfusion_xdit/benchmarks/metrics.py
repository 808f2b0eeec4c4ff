"""Image fidelity metrics: PSNR and SSIM (Wang et al. 2004, Gaussian window), numpy only.

    psnr(ref, img)            # dB; inf when identical; uint8 images use peak 255, floats peak 1
    range_psnr(ref, x)        # dB over the reference's value range (latents, activations)
    ssim(ref, img)            # mean SSIM over channels, in [-1, 1]

SSIM uses the usual constants (K1 0.01, K2 0.03, an 11-tap Gaussian of sigma 1.5, valid region only,
sample covariance), computed per channel and averaged.
"""

from __future__ import annotations

import math

import numpy as np


def _as_float(image) -> tuple[np.ndarray, float]:
    array = np.asarray(image)
    peak = 255.0 if array.dtype == np.uint8 else 1.0
    array = array.astype(np.float64)
    if array.ndim == 2:
        array = array[..., None]
    return array, peak


def psnr(reference, image) -> float:
    """Peak signal-to-noise ratio of `image` against `reference` in dB (inf when equal)."""
    ref, peak = _as_float(reference)
    img, _ = _as_float(image)
    if ref.shape != img.shape:
        raise ValueError(f"image shapes differ: {ref.shape} vs {img.shape}")
    mse = float(np.mean((ref - img) ** 2))
    return math.inf if mse == 0.0 else 10.0 * math.log10(peak * peak / mse)


def range_psnr(reference, x) -> float:
    """PSNR of `x` against `reference` with peak = the reference's value range (max - min), in dB;
    inf when equal. For latents and activations, which have no fixed peak. Takes tensors or arrays."""
    ref = np.asarray(reference, dtype=np.float64)
    arr = np.asarray(x, dtype=np.float64)
    if ref.shape != arr.shape:
        raise ValueError(f"shapes differ: {ref.shape} vs {arr.shape}")
    mse = float(np.mean((ref - arr) ** 2))
    span = float(ref.max() - ref.min())
    return math.inf if mse == 0.0 else 10.0 * math.log10(span * span / mse)


def _gaussian_kernel(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    g = np.exp(-(x * x) / (2.0 * sigma * sigma))
    return g / g.sum()


def _filter_valid(plane: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Separable 2-D filtering keeping only windows that lie fully inside the image."""
    k = len(kernel)
    rows = np.stack([plane[:, i:plane.shape[1] - k + 1 + i] for i in range(k)], 0)
    out = np.tensordot(kernel, rows, axes=1)
    cols = np.stack([out[i:out.shape[0] - k + 1 + i, :] for i in range(k)], 0)
    return np.tensordot(kernel, cols, axes=1)


def ssim(reference, image, window: int = 11, sigma: float = 1.5) -> float:
    """Mean structural similarity of `image` against `reference` (channels averaged).

    Images smaller than the window use a window of their shorter side (odd)."""
    ref, peak = _as_float(reference)
    img, _ = _as_float(image)
    if ref.shape != img.shape:
        raise ValueError(f"image shapes differ: {ref.shape} vs {img.shape}")
    side = min(ref.shape[0], ref.shape[1])
    if side < window:
        window = side if side % 2 else side - 1
    kernel = _gaussian_kernel(window, sigma)
    c1, c2 = (0.01 * peak) ** 2, (0.03 * peak) ** 2
    n = window * window
    cov_norm = n / (n - 1.0) if n > 1 else 1.0  # sample (unbiased) covariance
    values = []
    for c in range(ref.shape[2]):
        x, y = ref[..., c], img[..., c]
        mx, my = _filter_valid(x, kernel), _filter_valid(y, kernel)
        vx = cov_norm * (_filter_valid(x * x, kernel) - mx * mx)
        vy = cov_norm * (_filter_valid(y * y, kernel) - my * my)
        cxy = cov_norm * (_filter_valid(x * y, kernel) - mx * my)
        s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
        values.append(float(s.mean()))
    return float(np.mean(values))


def finite_or_none(value: float) -> float | None:
    """JSON has no inf: identical images are stored as null (and shown as 'identical')."""
    return None if value is None or not math.isfinite(value) else value


def fmt_db(value: float | None) -> str:
    return "identical" if value is None or (isinstance(value, float) and math.isinf(value)) else f"{value:.1f}"
