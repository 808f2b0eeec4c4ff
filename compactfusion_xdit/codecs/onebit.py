"""1-bit codec: the sign of each element, with a rank-1 magnitude m[c] · t[n]."""

import torch

from .base import Codec, bf16_round
from .packing import pack, packed_width, unpack


class OneBitCodec(Codec):
    """sign(x) · m[c] · t[n]: m = per-channel mean |x|, t = per-token mean |x| normalised to mean 1."""

    name = "1bit"
    row_marker = 2  # t, the per-token magnitude

    def layout(self, shape, dtype):
        n, c = shape
        return [((n, packed_width(c, 1)), torch.uint8), ((c,), torch.bfloat16), ((n,), torch.bfloat16)]

    def _encode_values(self, v, dtype):
        a = v.abs()
        m = bf16_round(a.mean(dim=0))
        tt = a.mean(dim=1)
        tbar = tt.mean()
        t = bf16_round(torch.where(tbar > 0, tt / tbar, 0.0))
        bits = (v >= 0).to(torch.uint8)
        return pack(bits, 1), m.to(torch.bfloat16), t.to(torch.bfloat16)

    def _decode_values(self, tensors, shape, dtype):
        data, m, t = tensors
        sign = unpack(data, 1, shape[1]).float().mul_(2).sub_(1)
        return sign.mul_(m.float()[None, :] * t.float()[:, None])  # m·t rounded first, then ±1 (exact)
