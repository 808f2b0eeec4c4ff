"""compactfusion-xdit: residual-compressed communication for xDiT parallel diffusion inference."""

__version__ = "0.1.0"
