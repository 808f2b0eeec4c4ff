"""compactfusion-xdit: residual-compressed communication for xDiT parallel diffusion inference."""

__version__ = "0.1.0"

from compactfusion_xdit.api import install, uninstall, xDiTParallel  # noqa: E402  (light: no torch/xfuser import)
