"""Low-rank codec: randomised subspace iteration, both factors on the wire."""

import torch

from .base import Codec

POWER_ITERATIONS = 2
SEED = 0x5EED


class LowRankCodec(Codec):
    """x ≈ U Vᵀ with U (N×R') orthonormal, V = xᵀU (C×R'), R' = min(R, N, C); factors in x's dtype.

    The random start comes from a fixed-seed generator local to the sender; the receiver only
    multiplies the factors, so no RNG state is shared.
    """

    def __init__(self, rank: int):
        if rank < 1:
            raise ValueError(f"lowrank rank must be a positive integer, got {rank}")
        self.rank = rank
        self.name = f"lowrank-{rank}"

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
        return q.to(dtype), (v.T @ q).to(dtype)

    def _decode_values(self, tensors, shape, dtype):
        u, vt = tensors
        return u.float() @ vt.float().T
