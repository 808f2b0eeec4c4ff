"""Low-rank codec: randomised subspace iteration, both factors on the wire."""

import torch

from .base import Codec, saturate_

POWER_ITERATIONS = 2
SEED = 0x5EED


class LowRankCodec(Codec):
    """x ≈ U Vᵀ, rank R' = min(R, N, C); U (N×R') and V (C×R') sent in x's dtype.

    Q (N×R', orthonormal columns) comes from randomised subspace iteration and W = xᵀQ; the
    factors are balanced, U = Q·diag(√w), V = W·diag(1/√w) with w the column norms of W, so that
    neither factor leaves float16's range (W alone would reach ‖x‖ ≈ √N · max|x|). The random
    start comes from a fixed-seed generator local to the sender; the receiver only multiplies the
    factors, so no RNG state is shared.
    """

    def __init__(self, rank: int):
        if rank < 1:
            raise ValueError(f"lowrank rank must be a positive integer, got {rank}")
        self.rank = rank
        self.name = f"lowrank-{rank}"

    row_marker = 0  # U's rows
    def _r(self, shape):
        return min(self.rank, shape[0], shape[1])

    def layout(self, shape, dtype):
        n, c = shape
        r = self._r(shape)
        return [((n, r), dtype), ((c, r), dtype)]

    def _encode_values(self, v, dtype):
        n, c = v.shape
        r = self._r((n, c))
        gen = torch.Generator(device=v.device).manual_seed(SEED)
        omega = torch.randn(c, r, generator=gen, device=v.device, dtype=torch.float32)
        q = torch.linalg.qr(v @ omega).Q
        for _ in range(POWER_ITERATIONS):
            z = torch.linalg.qr(v.T @ q).Q
            q = torch.linalg.qr(v @ z).Q
        w = v.T @ q
        root = torch.linalg.vector_norm(w, dim=0).sqrt_()
        root = torch.where(root > 0, root, torch.ones_like(root))  # a zero column: leave Q as is
        u = q.mul_(root)
        u.masked_fill_((v == 0).all(dim=1, keepdim=True), 0.0)  # a zero row codes to exact zeros (QR leaves ~1e-17)
        w.div_(root)
        return saturate_(u, dtype).to(dtype), saturate_(w, dtype).to(dtype)

    def _decode_values(self, tensors, shape, dtype):
        u, vt = tensors
        return u.float() @ vt.float().T
