"""Per-token (row) scaled integer codecs: int8, int4 (absmax) and int2 (4-level, mean-|x| step)."""

import torch

from .base import Codec, bf16_round
from .packing import pack, packed_width, unpack


class AbsmaxCodec(Codec):
    """Symmetric absmax quantisation per row: q = rint(x / s), s = bf16(max|x| / qmax)."""

    rows_independent = True
    row_marker = 1  # the scale

    def __init__(self, bits: int):
        self.bits = bits
        self.qmax = (1 << (bits - 1)) - 1
        self.offset = 1 << (bits - 1)
        self.name = f"int{bits}"

    def layout(self, shape, dtype):
        n, c = shape
        return [((n, packed_width(c, self.bits)), torch.uint8), ((n,), torch.bfloat16)]

    def _encode_values(self, v, dtype):
        lo, hi = torch.aminmax(v, dim=1)
        a = torch.maximum(hi, lo.neg())  # max |x| without a full-size |x| temporary
        s = bf16_round(a / torch.full_like(a, self.qmax))[:, None]  # a tensor divisor: CUDA would multiply by 1/qmax
        q = v / s
        q.round_().clamp_(-self.qmax, self.qmax)  # round = rint (half to even)
        q.masked_fill_(s == 0, 0.0)  # an all-zero row: 0/0 would be NaN
        codes = q.add_(self.offset).to(torch.uint8)
        return pack(codes, self.bits), s.squeeze(1).to(torch.bfloat16)

    def _decode_values(self, tensors, shape, dtype):
        data, s = tensors
        q = unpack(data, self.bits, shape[1]).float().sub_(self.offset)
        return q.mul_(s.float()[:, None])


class Int2Codec(Codec):
    """Four uniform levels (q + 0.5)·d, q in -2..1, step d = bf16(1.25 · mean|x|) per row.

    1.25 × mean|x| is the MSE-optimal uniform step for a Gaussian row; unlike an absmax step it is
    not set by the row's largest outlier.
    """

    name = "int2"
    bits = 2
    rows_independent = True
    row_marker = 1  # the step

    def layout(self, shape, dtype):
        n, c = shape
        return [((n, packed_width(c, 2)), torch.uint8), ((n,), torch.bfloat16)]

    def _encode_values(self, v, dtype):
        total = v.abs().sum(dim=1)
        d = bf16_round((total / torch.full_like(total, v.shape[1])) * 1.25)[:, None]
        q = v / d
        q.floor_().clamp_(-2.0, 1.0)
        q.masked_fill_(d == 0, 0.0)  # an all-zero row: 0/0 would be NaN
        return pack(q.add_(2).to(torch.uint8), 2), d.squeeze(1).to(torch.bfloat16)

    def _decode_values(self, tensors, shape, dtype):
        data, d = tensors
        q = unpack(data, 2, shape[1]).float().sub_(2)
        return q.add_(0.5).mul_(d.float()[:, None])
