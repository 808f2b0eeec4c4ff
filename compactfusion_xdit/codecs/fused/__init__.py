"""Fused Triton kernels for the quantising codecs, with the dispatch the codec base class calls.

Each call is one pass over memory (1bit: a statistics pass, then a coding pass) that reproduces
the arithmetic of docs/codec_format.md bit for bit: payloads equal the torch reference's exactly
where its reductions are maxima (int8, int4), and within the documented bound where they are sums
(int2's mean |r|, 1bit's means); decoding a given payload, and every cache update, is bitwise
equal to the torch path, so a fused sender and a torch receiver (or the reverse) stay in sync.

    from compactfusion_xdit.codecs import fused
    if fused.supports(codec.name, x):
        payload = fused.encode_residual(codec, x, base)    # base updated in place

`supports` is False (and nothing imports triton) off CUDA, without triton, for codecs it does not
handle (none, lowrank-R: matmul-bound, left to cuBLAS through torch), or when the environment sets
CFX_FORCE_TORCH=1. Under TRITON_INTERPRET=1 CPU tensors are accepted too (how the CPU tests run
the kernels).
"""
import functools
import importlib.util
import os
import warnings

import torch

from compactfusion_xdit import envs
from compactfusion_xdit.codecs.payload import check_base

FUSED_CODECS = ("int8", "int4", "int2", "1bit")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """True when triton can be imported (checked once; importing it is slow)."""
    return importlib.util.find_spec("triton") is not None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def supports(codec_name: str, x: torch.Tensor) -> bool:
    """Whether the fused path handles `codec_name` for 2-D tensor `x` here and now.

    `x` is the tensor being coded, the cache, or (for a plain decode) the payload's data tensor:
    only its device and rank matter here; the entry points check dtypes.
    """
    if envs.flag(envs.FORCE_TORCH):
        return False
    if codec_name not in FUSED_CODECS or x.dim() != 2:
        return False
    if not (x.is_cuda or (_interpreting() and x.device.type == "cpu")):
        return False
    if not triton_available():
        _warn_no_triton()
        return False
    return True


@functools.lru_cache(maxsize=1)
def _warn_no_triton() -> None:
    """Once per process: CUDA tensors are coded by the torch reference path (same bits, slower)."""
    warnings.warn("compactfusion_xdit: Triton is not installed, so the codecs run the torch reference path "
                  "on CUDA (the same payloads, several times slower); pip install triton", RuntimeWarning,
                  stacklevel=3)


# ---- tensor-level API (payload tensors in wire order) ----------------------------------------

def encode_tensors(codec_name, x, base=None, error_feedback=True):
    """Payload tensors of x (plain, base None) or of x - base (residual: base updated in place)."""
    _check_name(codec_name)
    if x.dim() != 2 or x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"fused {codec_name}: expected a 2-D float16/bfloat16/float32 tensor, got "
                         f"{x.dtype} of shape {tuple(x.shape)}; reshape to (tokens, channels)")
    x = x.contiguous()
    if base is None:
        return _encode_impl(codec_name, x, None, error_feedback)
    check_base(x, base)
    work = base if base.is_contiguous() else base.contiguous()
    tensors = _encode_impl(codec_name, x, work, error_feedback)
    if work is not base:
        base.copy_(work)
    return tensors


def decode_tensors(codec_name, tensors, shape, dtype, base=None):
    """deq(payload) cast to dtype (plain), or base += deq(payload) in place (residual)."""
    _check_name(codec_name)
    if dtype not in _FLOAT_DTYPES:
        raise ValueError(f"fused {codec_name}: cannot decode into {dtype}; use float16/bfloat16/float32")
    tensors = tuple(t.contiguous() for t in tensors)
    if base is None:
        return _decode_impl(codec_name, tensors, tuple(shape), dtype, None)
    if tuple(base.shape) != tuple(shape):
        raise ValueError(f"base shape {tuple(base.shape)} does not match the payload's {tuple(shape)}")
    work = base if base.is_contiguous() else base.contiguous()
    _decode_impl(codec_name, tensors, tuple(shape), base.dtype, work)
    if work is not base:
        base.copy_(work)
    return base


def _encode_impl(name, x, base, error_feedback):
    if name == "1bit":
        from .onebit import onebit_encode
        return onebit_encode(x, base, error_feedback)
    from .rowwise import row_encode
    return row_encode(name, x, base, error_feedback)


def _decode_impl(name, tensors, shape, dtype, base):
    if name == "1bit":
        from .onebit import onebit_decode
        return onebit_decode(*tensors, shape, dtype, base=base)
    from .rowwise import row_decode
    return row_decode(name, *tensors, shape, dtype, base=base)


def _check_name(name):
    if name not in FUSED_CODECS:
        raise ValueError(f"fused kernels handle {', '.join(FUSED_CODECS)}, not {name!r}; "
                         "use the codec's torch path")



# ---- Payload-level API (what the codec base class calls) --------------------------------------

def encode(codec, x):
    """Plain encode of x with `codec` (a codecs.Codec); returns its Payload."""
    return _payload(codec, encode_tensors(codec.name, x), x)


def decode(codec, payload):
    """Plain decode: deq(payload) in the payload's dtype."""
    return decode_tensors(codec.name, payload.tensors, payload.shape, payload.dtype)


def encode_residual(codec, x, base, error_feedback=True):
    """Residual encode: payload of x - base; base updated in place (see docs/codec_format.md)."""
    return _payload(codec, encode_tensors(codec.name, x, base, error_feedback), x)


def decode_residual(codec, payload, base):
    """Receiver update: base = (base.float() + deq(payload)).to(base.dtype), in place."""
    decode_tensors(codec.name, payload.tensors, payload.shape, payload.dtype, base)


def _payload(codec, tensors, x):
    from compactfusion_xdit.codecs.payload import Payload
    return Payload(tensors=tuple(tensors), shape=tuple(x.shape), dtype=x.dtype, codec=codec.name)
