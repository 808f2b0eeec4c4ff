"""The `none` codec: the tensor's own bytes; decode(encode(x)) is bitwise x."""

import torch

from .base import Codec, _check_base, _check_tensor


class NoneCodec(Codec):
    """Identity: the payload is x's bytes, the reconstruction is x itself (bitwise)."""

    name = "none"

    def layout(self, shape, dtype):
        n, c = shape
        return [((n, c * torch.empty((), dtype=dtype).element_size()), torch.uint8)]

    def encode(self, x):
        _check_tensor(x, self.name)
        return self._payload((x.contiguous().view(torch.uint8).reshape(x.shape[0], -1).clone(),), x)

    def decode_float(self, p):
        return self.decode(p).float()

    def decode(self, p):
        return p.tensors[0].contiguous().view(p.dtype).reshape(p.shape)

    def encode_residual(self, x, base, error_feedback=True):
        # The identity codec sends x itself; the cache just mirrors it.
        _check_tensor(x, self.name)
        _check_base(x, base)
        base.copy_(x)
        return self.encode(x)

    def decode_residual(self, p, base):
        base.copy_(self.decode(p))
