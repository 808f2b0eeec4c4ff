"""Compiled CPU codecs: int8, int4, int2 and 1bit in one numba-compiled call per encode/decode.

The CPU counterpart of `codecs.fused` (Triton, CUDA), with the same entry points and the same
guarantees (docs/codec_format.md): payloads bitwise equal to the torch reference for int8/int4
(max reductions); for int2/1bit (sum reductions, summed here in float64 in a fixed order) each
scale equals the reference's or is one bf16 ulp away, in a few rows at most; decoding a payload
and every cache update are bitwise equal to the torch path, so a compiled sender and a torch
receiver (or the reverse) keep bitwise-equal caches.

    from compactfusion_xdit.codecs import cpu
    if cpu.supports(codec.name, x):
        payload = cpu.encode_residual(codec, x, base)      # base updated in place

`supports` is False (the torch reference runs) for CUDA tensors, codecs without a kernel (none,
lowrank-R), CFX_FORCE_TORCH=1, without numba (one warning), and while the kernels are not yet
compiled: the first use starts that in the background (`_loader`), so no request waits for a
compile; the torch path serves until it is done, which is safe because both paths decode alike.
`ensure_compiled()` waits for it (benchmarks, tests).
"""
from __future__ import annotations

import numpy as np
import torch

from compactfusion_xdit import envs
from compactfusion_xdit.codecs.payload import Payload, check_base

from . import _loader

CPU_CODECS = ("int8", "int4", "int2", "1bit")
_BITS = {"int8": 8, "int4": 4, "int2": 2}
_KIND = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def supports(codec_name: str, x: torch.Tensor) -> bool:
    """Whether the compiled CPU path takes this call now (x: the coded tensor, the cache, or a
    payload's data tensor; only its device and rank matter here)."""
    if envs.flag(envs.FORCE_TORCH):
        return False
    return takes(codec_name, x)


def takes(codec_name: str, x: torch.Tensor) -> bool:
    """`supports` without the CFX_FORCE_TORCH check (the codec base class has made it)."""
    if codec_name not in CPU_CODECS or not x.is_cpu or x.dim() != 2:
        return False
    return _loader.kernels() is not None


def ensure_compiled(timeout: float | None = None) -> bool:
    """Start the compile if needed and wait for it; True when the compiled path is usable."""
    return _loader.kernels(wait=True, timeout=timeout) is not None


def status() -> str:
    """'ready', 'compiling', 'unavailable: <why>' or 'not started'."""
    return _loader.status()


# ---- tensor-level API (payload tensors in wire order) ----------------------------------------

def _np(t: torch.Tensor) -> np.ndarray:
    """A numpy view of a contiguous CPU tensor; 16-bit floats as their uint16 bits."""
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.view(torch.uint16)
    try:
        return t.numpy()
    except RuntimeError:  # a tensor that requires grad
        return t.detach().numpy()


def _compiled():
    k = _loader.kernels()
    if k is None:
        k = _loader.kernels(wait=True)
        if k is None:
            raise RuntimeError(f"compactfusion_xdit: compiled CPU codecs unavailable ({_loader.status()})")
    return k


def encode_tensors(codec_name, x, base=None, error_feedback=True):
    """Payload tensors of x (plain, base None) or of x - base (residual: base updated in place)."""
    _check_name(codec_name)
    if x.dim() != 2 or x.dtype not in _KIND:
        raise ValueError(f"cpu {codec_name}: expected a 2-D float16/bfloat16/float32 tensor, got "
                         f"{x.dtype} of shape {tuple(x.shape)}; reshape to (tokens, channels)")
    if base is not None:
        check_base(x, base)
    return _encode(codec_name, x, base, error_feedback)


def _encode(codec_name, x, base, error_feedback):
    K = _compiled()
    x = x.contiguous()
    residual = base is not None
    work = x if not residual else base if base.is_contiguous() else base.contiguous()
    N, C = x.shape
    kind = _KIND[x.dtype]
    xn, bn = _np(x), _np(work)
    if codec_name == "1bit":
        data = np.empty((N, -(-C // 8)), np.uint8)
        m = np.empty(C, np.uint16)
        t = np.empty(N, np.uint16)
        K.onebit_encode(xn, bn, data, m, t, kind, residual, bool(error_feedback))
        tensors = (torch.from_numpy(data), torch.from_numpy(m).view(torch.bfloat16),
                   torch.from_numpy(t).view(torch.bfloat16))
    else:
        bits = _BITS[codec_name]
        data = np.empty((N, -(-C // (8 // bits))), np.uint8)
        s = np.empty(N, np.uint16)
        K.row_encode(xn, bn, data, s, kind, bits, residual, bool(error_feedback))
        tensors = (torch.from_numpy(data), torch.from_numpy(s).view(torch.bfloat16))
    if residual and work is not base:
        base.copy_(work)
    return tensors


def decode_tensors(codec_name, tensors, shape, dtype, base=None):
    """deq(payload) cast to dtype (plain), or base += deq(payload) in place (residual)."""
    _check_name(codec_name)
    if dtype not in _KIND:
        raise ValueError(f"cpu {codec_name}: cannot decode into {dtype}; use float16/bfloat16/float32")
    shape = tuple(int(s) for s in shape)
    _check_payload(codec_name, tensors, shape)
    K = _compiled()
    parts = [_np(t.contiguous()) for t in tensors]
    if base is None:
        out = torch.empty(shape, dtype=dtype)
        work = out
    else:
        if tuple(base.shape) != shape:
            raise ValueError(f"base shape {tuple(base.shape)} does not match the payload's {shape}")
        work = base if base.is_contiguous() else base.contiguous()
    kind = _KIND[work.dtype]
    if codec_name == "1bit":
        K.onebit_decode(parts[0], parts[1], parts[2], _np(work), kind, base is not None)
    else:
        K.row_decode(parts[0], parts[1], _np(work), kind, _BITS[codec_name], base is not None)
    if base is None:
        return work
    if work is not base:
        base.copy_(work)
    return base


def _check_name(name):
    if name not in CPU_CODECS:
        raise ValueError(f"compiled CPU codecs handle {', '.join(CPU_CODECS)}, not {name!r}; "
                         "use the codec's torch path")


def _layout(name, shape):
    N, C = shape
    if name == "1bit":
        return [((N, -(-C // 8)), torch.uint8), ((C,), torch.bfloat16), ((N,), torch.bfloat16)]
    return [((N, -(-C // (8 // _BITS[name]))), torch.uint8), ((N,), torch.bfloat16)]


def _check_payload(name, tensors, shape):
    """The kernels index without bounds checks: a payload must have exactly the codec's layout."""
    if len(shape) != 2 or shape[0] < 1 or shape[1] < 1:
        raise ValueError(f"cpu {name}: expected a 2-D shape with N, C >= 1, got {shape}")
    expected = _layout(name, shape)
    got = [(tuple(t.shape), t.dtype) for t in tensors]
    if got != expected or any(t.device.type != "cpu" for t in tensors):
        raise ValueError(f"cpu {name}: payload tensors {got} do not match the layout {expected} of shape {shape}")



# ---- Payload-level API (what the codec base class calls) --------------------------------------

def encode(codec, x):
    """Plain encode of x with `codec` (a codecs.Codec, which has checked x); returns its Payload."""
    return _payload(codec, _encode(codec.name, x, None, True), x)


def decode(codec, payload):
    """Plain decode: deq(payload) in the payload's dtype."""
    return decode_tensors(codec.name, payload.tensors, payload.shape, payload.dtype)


def encode_residual(codec, x, base, error_feedback=True):
    """Residual encode: payload of x - base; base updated in place (see docs/codec_format.md).
    The codec base class has checked x and base."""
    return _payload(codec, _encode(codec.name, x, base, error_feedback), x)


def decode_residual(codec, payload, base):
    """Receiver update: base = (base.float() + deq(payload)).to(base.dtype), in place."""
    if tuple(base.shape) != tuple(payload.shape) or base.dtype != payload.dtype:
        raise ValueError(f"cpu {codec.name}: cache {tuple(base.shape)} {base.dtype} does not match payload "
                         f"{tuple(payload.shape)} {payload.dtype}; reset the channel")
    decode_tensors(codec.name, payload.tensors, payload.shape, payload.dtype, base)


def _payload(codec, tensors, x):
    return Payload(tensors=tuple(tensors), shape=tuple(x.shape), dtype=x.dtype, codec=codec.name)
