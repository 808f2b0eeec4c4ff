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

The block API codes several links' messages straight into a (links, bytes) send buffer and
decodes them straight out of a receive buffer, one compiled call for all links:

    cpu.encode_block("int4", x3, base3, send, offset, skip=rank, residual=True)
    cpu.decode_block("int4", recv, offset, base3, out3, skip=rank, residual=True, src3=x3)

`supports` is False (the torch reference runs) for CUDA tensors, codecs without a kernel (none,
lowrank-R), CFX_CPU_KERNELS=0, CFX_FORCE_TORCH=1, without numba (one warning), and in a process
whose first call found the kernels not yet compiled: that call starts the compile in the
background for later processes (`_loader`), and this process keeps the torch path for its whole
life, so no request waits for a compile and no process switches paths mid-run.
`ensure_compiled()` waits for the compile and switches this process to the kernels (benchmarks,
tests).
"""
from __future__ import annotations

import math
import operator

import numpy as np
import torch

from compactfusion_xdit import envs
from compactfusion_xdit.codecs.payload import Payload, check_base

from . import _loader

CPU_CODECS = ("int8", "int4", "int2", "1bit")
_BITS = {"int8": 8, "int4": 4, "int2": 2}
_KIND = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def enabled() -> bool:
    """CFX_CPU_KERNELS: unset or anything but "0" lets the compiled path run (the default); "0"
    keeps every CPU tensor on the torch reference."""
    return envs.get(envs.CPU_KERNELS) != "0"


def supports(codec_name: str, x: torch.Tensor) -> bool:
    """Whether the compiled CPU path takes this call (x: the coded tensor, the cache, a payload's
    data tensor, or a block's (links, N, C) tensor; only its device and rank matter here). The
    answer is the same for the whole process (the first call decides; see `_loader`) unless
    `ensure_compiled()` switches it on, or the environment flags change."""
    if envs.flag(envs.FORCE_TORCH) or not enabled():
        return False
    return takes(codec_name, x)


def takes(codec_name: str, x: torch.Tensor) -> bool:
    """`supports` without the environment checks (the codec base class has made them)."""
    if codec_name not in CPU_CODECS or not x.is_cpu or x.dim() not in (2, 3):
        return False
    return (_loader._module or _loader.kernels()) is not None


def prefetch() -> None:
    """Start loading the kernels in the background (see `_loader.prefetch`); no-op when off."""
    if enabled() and not envs.flag(envs.FORCE_TORCH):
        _loader.prefetch()


def ensure_compiled(timeout: float | None = None) -> bool:
    """Start the compile if needed, wait for it, and switch this process to the compiled path;
    True when it is in use."""
    return _loader.kernels(wait=True, timeout=timeout) is not None


def status() -> str:
    """'ready', 'compiling', 'torch for this process (compiled for later ones)',
    'unavailable: <why>' or 'not started'."""
    return _loader.status()


# ---- tensor-level API (payload tensors in wire order) ----------------------------------------

def _np(t: torch.Tensor) -> np.ndarray:
    """A numpy view of a contiguous CPU tensor; 16-bit floats as their bits (uint16)."""
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.view(torch.uint16)
    try:
        return t.numpy()
    except RuntimeError:  # a tensor that requires grad
        return t.detach().numpy()


def _np_values(t: torch.Tensor) -> np.ndarray:
    """_np of a tensor of values (x, a cache, an output): bfloat16 as int16 bits, which the kernels
    tell apart from float16's uint16 by type."""
    return _np(t.view(torch.int16) if t.dtype is torch.bfloat16 else t)


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
    xn, bn = _np_values(x), _np_values(work)
    if codec_name == "1bit":
        data = np.empty((N, -(-C // 8)), np.uint8)
        m = np.empty(C, np.uint16)
        t = np.empty(N, np.uint16)
        K.onebit_encode(xn, bn, data, m, t, residual, bool(error_feedback))
        tensors = (torch.from_numpy(data), torch.from_numpy(m).view(torch.bfloat16),
                   torch.from_numpy(t).view(torch.bfloat16))
    else:
        bits = _BITS[codec_name]
        data = np.empty((N, -(-C // (8 // bits))), np.uint8)
        s = np.empty(N, np.uint16)
        K.row_encode(xn, bn, data, s, bits, residual, bool(error_feedback))
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
    if codec_name == "1bit":
        K.onebit_decode(parts[0], parts[1], parts[2], _np_values(work), base is not None)
    else:
        K.row_decode(parts[0], parts[1], _np_values(work), _BITS[codec_name], base is not None)
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



# ---- block API: code into a send buffer, decode out of a receive buffer ---------------------

_BLOCK_BITS = {"int8": 8, "int4": 4, "int2": 2, "1bit": 1}


def block_nbytes(codec_name: str, N: int, C: int) -> int:
    """Bytes of one message of an (N, C) tensor in a block (= the codec's payload_nbytes)."""
    return sum(math.prod(shape) * dtype.itemsize for shape, dtype in _layout(codec_name, (N, C)))


def _block_args(where, codec_name, t3, wire2, offset, skip):
    """Checks shared by encode_block / decode_block; (bits, L, N, C, nbytes, offset, skip, kind)."""
    if t3.dim() != 3 or not t3.is_cpu or not t3.is_contiguous():
        raise ValueError(f"cpu {where}: expected a contiguous 3-D (links, N, C) float16/bfloat16/float32 "
                         f"CPU tensor, got {t3.dtype} of shape {tuple(t3.shape)} on {t3.device}"
                         + ("" if t3.is_contiguous() else " (not contiguous)"))
    return _block_geometry(where, codec_name, tuple(t3.shape), t3.dtype, wire2, offset, skip)


def _block_geometry(where, codec_name, shape3, dtype, wire2, offset, skip):
    """`_block_args` for a block given by its (L, N, C) shape and dtype."""
    bits = _BLOCK_BITS.get(codec_name)
    if bits is None:
        _check_name(codec_name)
    kind = _KIND.get(dtype)
    if kind is None:
        raise ValueError(f"cpu {where}: expected float16/bfloat16/float32 links, got {dtype}")
    L, N, C = shape3
    if wire2.dtype != torch.uint8 or wire2.dim() != 2 or not wire2.is_cpu or not wire2.is_contiguous():
        raise ValueError(f"cpu {where}: the wire must be a contiguous 2-D uint8 CPU tensor (links, bytes), "
                         f"got {wire2.dtype} of shape {tuple(wire2.shape)} on {wire2.device}")
    nbytes = wire2.shape[1]
    if type(offset) is not int:
        offset = operator.index(offset)
    if type(skip) is not int:
        skip = operator.index(skip)
    if wire2.shape[0] != L or N < 1 or C < 1:
        raise ValueError(f"cpu {where}: the wire has {wire2.shape[0]} rows (links) for a tensor of shape "
                         f"{(L, N, C)}; expected {L} rows and N, C >= 1")
    need = block_nbytes(codec_name, N, C)
    if offset < 0 or offset + need > nbytes:
        raise ValueError(f"cpu {where}: a {codec_name} message of ({N}, {C}) takes {need} bytes: offset {offset} "
                         f"does not fit the wire's {nbytes} bytes per link")
    if skip < -1 or skip >= L:
        raise ValueError(f"cpu {where}: skip must be -1 or a link in [0, {L}), got {skip}")
    return bits, L, N, C, nbytes, offset, skip, kind


def _cache_ptr(where, base3, like, residual) -> tuple[int, bool]:
    """(address of the caches, residual) for a block call; plain: like's address (unused)."""
    if not residual:
        return like.data_ptr(), False
    if base3 is not like:
        _check_cache(where, base3, like.dtype, like.shape)
    return base3.data_ptr(), True


def _check_cache(where, base3, dtype, shape) -> None:
    if base3 is None:
        raise ValueError(f"cpu {where}: residual coding needs base3 (the cache)")
    _same(where, "base3", base3, dtype, shape)


def _same(where, what, t, dtype, shape):
    if t.dtype != dtype or tuple(t.shape) != tuple(shape) or not t.is_cpu or not t.is_contiguous():
        raise ValueError(f"cpu {where}: {what} must be a contiguous CPU tensor like x ({dtype}, "
                         f"{tuple(shape)}), got {t.dtype} of shape {tuple(t.shape)} on {t.device}"
                         + ("" if t.is_contiguous() else " (not contiguous)"))


def encode_block(codec_name, x3, base3, wire2, offset, skip, residual, error_feedback=True) -> int:
    """Code x3[l] (plain) or x3[l] - base3[l] (residual) into wire2[l, offset:offset + P] for every
    link l != skip, in one compiled call (P = the codec's payload_nbytes((N, C), dtype)).

    x3, base3: contiguous (L, N, C) CPU tensors of one float dtype (base3 may be None when plain);
    wire2: contiguous (L, nbytes) uint8. Residual: base3[l] is updated in place as
    encode_residual does (error_feedback: base + deq; else: x). A row of x3[l] with a NaN or an
    infinity is coded as a zero residual (its cache row becomes base + 0.0, or stays as it was
    without error feedback) and its scale (1bit: t) bytes carry the bf16 NaN 0x7FC0 instead.
    Returns the number of such rows."""
    bits, L, N, C, nbytes, offset, skip, kind = _block_args("encode_block", codec_name, x3, wire2, offset, skip)
    pb, residual = _cache_ptr("encode_block", base3, x3, residual)
    K = _loader._module or _compiled()
    return K.encode_block_ptr(x3.data_ptr(), pb, wire2.data_ptr(), L, N, C, nbytes, offset, skip, kind, bits,
                              residual, bool(error_feedback))


def decode_block(codec_name, wire2, offset, base3, out3, skip, residual, src3=None) -> None:
    """Decode wire2[l, offset:] into out3[l] for every link l != skip, in one compiled call.

    Plain: out3[l] <- deq cast to out3's dtype (base3 may be None). Residual: base3[l] <-
    base3[l] + deq (as decode_residual) and out3[l] <- base3[l]. A row whose scale (1bit: t) is a
    NaN is decoded with scale +0.0 and its out3 row set to the dtype's quiet NaN. With src3,
    out3[skip] <- src3[skip]; otherwise out3[skip] is left alone."""
    bits, L, N, C, nbytes, offset, skip, kind = _block_args("decode_block", codec_name, out3, wire2, offset, skip)
    po = out3.data_ptr()
    pb, residual = _cache_ptr("decode_block", base3, out3, residual)
    if src3 is None:
        ps, has_src = po, False
    else:
        if src3 is not out3:
            _same("decode_block", "src3", src3, out3.dtype, out3.shape)
        ps, has_src = src3.data_ptr(), skip >= 0
    K = _loader._module or _compiled()
    K.decode_block_ptr(wire2.data_ptr(), pb, po, ps, L, N, C, nbytes, offset, skip, kind, bits, residual, has_src)


class PreparedBlock:
    """`encode_block` / `decode_block` of fixed links, checked once: a communicator that codes
    the same links into the same wire every step calls `encode(x)` / `decode(out)` with only the
    tensor changing (its pointer, after a dtype and size check). x and out hold ``W`` links of
    (N, C) rows contiguously; this block codes links ``start .. start + L - 1`` of them, with the
    caches `base3` (L, N, C; None when plain) and the message bytes in `wire2` (L, nbytes) at
    `offset`. The caller keeps base3 and wire2 alive and unmoved while it uses this object."""

    __slots__ = ("dtype", "numel", "shift", "_enc", "_dec", "_kernels")

    def __init__(self, codec_name, links: int, start: int, N: int, C: int, dtype: torch.dtype, base3, wire2,
                 offset: int, residual: bool, error_feedback: bool = True) -> None:
        bits, L, N, C, nbytes, offset, _, kind = _block_geometry("PreparedBlock", codec_name, (links, N, C), dtype,
                                                                  wire2, offset, -1)
        if residual:
            _check_cache("PreparedBlock", base3, dtype, (L, N, C))
        pb = base3.data_ptr() if residual else 0
        self.dtype, self.shift = dtype, start * N * C * dtype.itemsize
        self.numel = (start + L) * N * C  # at least this many elements in x / out
        pw = wire2.data_ptr()
        self._enc = (pb, pw, L, N, C, nbytes, offset, -1, kind, bits, bool(residual), bool(error_feedback))
        self._dec = (pw, pb, L, N, C, nbytes, offset, -1, kind, bits, bool(residual), False)
        self._kernels = _loader._module or _compiled()

    def _ptr(self, t: torch.Tensor) -> int:
        if t.dtype is not self.dtype or t.numel() < self.numel or not t.is_contiguous() or not t.is_cpu:
            raise ValueError(f"cpu PreparedBlock: expected a contiguous CPU {self.dtype} tensor of at least "
                             f"{self.numel} elements, got {t.dtype} {tuple(t.shape)} on {t.device}")
        return t.data_ptr() + self.shift

    def encode(self, x: torch.Tensor) -> int:
        """Code the links from x; returns the rows marked non-finite."""
        pb, pw, *rest = self._enc
        px = self._ptr(x)
        return self._kernels.encode_block_ptr(px, pb if pb else px, pw, *rest)

    def decode(self, out: torch.Tensor) -> None:
        """Decode the links into out (and advance the caches)."""
        pw, pb, L, N, C, nbytes, offset, skip, kind, bits, residual, has_src = self._dec
        po = self._ptr(out)
        self._kernels.decode_block_ptr(pw, pb if pb else po, po, po, L, N, C, nbytes, offset, skip, kind, bits,
                                       residual, has_src)


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
