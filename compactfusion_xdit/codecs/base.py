"""Payload and the Codec base class: the torch reference arithmetic of docs/codec_format.md."""

from __future__ import annotations

import math

import torch

from compactfusion_xdit import envs
from compactfusion_xdit.codecs.payload import Payload
from compactfusion_xdit.codecs.payload import check_base as _check_base

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def to_dtype(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast float32 values to dtype, saturating at dtype's largest finite value (no overflow to inf)."""
    if dtype != torch.float32:
        big = torch.finfo(dtype).max
        values = values.clamp(-big, big)
    return values.to(dtype)


def saturate_(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """In place: clamp float32 `values` to dtype's finite range, so a later cast cannot give inf."""
    if dtype != torch.float32:
        big = torch.finfo(dtype).max
        values.clamp_(-big, big)
    return values


class Codec:
    """A tensor codec for 2-D (N tokens, C channels) float tensors.

    Subclasses define the wire layout (`layout`), the coding of float32 values (`_encode_values`)
    and its dequantisation (`_decode_values`). The base class provides plain and residual
    coding; it hands the quantising codecs to fused kernels that produce the same payloads and
    caches: Triton on CUDA (`compactfusion_xdit.codecs.fused`), numba on CPU
    (`compactfusion_xdit.codecs.cpu`).

        c = codecs.get("int4"); p = c.encode(x); y = c.decode(p)      # plain
        p = c.encode_residual(x, base)   # sender: codes x - base, base <- reconstruction
        c.decode_residual(p, base)       # receiver: base <- base + deq(p), bitwise like the sender
    """

    name = "codec"
    #: True when each row's payload and reconstruction depend on that row alone (per-row scales):
    #: coding a stack of same-shaped tensors in one call then gives each tensor's own bytes and
    #: caches, so a channel may batch several messages into one codec call.
    rows_independent = False

    # --- format -------------------------------------------------------------------------------
    def layout(self, shape: tuple, dtype: torch.dtype) -> list[tuple[tuple, torch.dtype]]:
        """(shape, dtype) of each wire tensor, in order, for a coded tensor of `shape`/`dtype`."""
        raise NotImplementedError

    def payload_nbytes(self, shape: tuple, dtype: torch.dtype) -> int:
        """Exact wire bytes for a tensor of this shape and dtype (independent of its values)."""
        n, c = _check_shape(shape)
        return sum(math.prod(s) * torch.empty((), dtype=d).element_size() for s, d in self.layout((n, c), dtype))

    def unflatten(self, buf: torch.Tensor, shape: tuple, dtype: torch.dtype) -> Payload:
        """Rebuild the payload that `flatten()` produced for a tensor of `shape` and `dtype`."""
        shape = _check_shape(shape)
        expected = self.payload_nbytes(shape, dtype)
        if buf.dtype != torch.uint8 or buf.dim() != 1 or buf.numel() != expected:
            raise ValueError(
                f"{self.name}: expected a 1-D uint8 buffer of {expected} bytes for shape {shape} {dtype}, "
                f"got {buf.dtype} of shape {tuple(buf.shape)}"
            )
        tensors, offset = [], 0
        for s, d in self.layout(shape, dtype):
            size = math.prod(s) * torch.empty((), dtype=d).element_size()
            chunk = buf[offset : offset + size]
            if d != torch.uint8:
                itemsize = torch.empty((), dtype=d).element_size()
                if chunk.storage_offset() % itemsize:
                    chunk = chunk.clone()  # dtype views need aligned storage
                chunk = chunk.view(d)
            tensors.append(chunk.reshape(s))
            offset += size
        return Payload(tensors=tuple(tensors), shape=shape, dtype=dtype, codec=self.name)

    # --- subclass hooks -----------------------------------------------------------------------
    def _encode_values(self, v: torch.Tensor, dtype: torch.dtype) -> tuple:
        """Wire tensors for float32 values `v` coded for a tensor of `dtype`."""
        raise NotImplementedError

    def _decode_values(self, tensors: tuple, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        """deq(payload) as float32."""
        raise NotImplementedError

    # --- plain coding -------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> Payload:
        """Code x itself."""
        _check_tensor(x, self.name)
        backend = _fused_backend(self.name, x)
        if backend is not None:
            return backend.encode(self, x)
        return self._payload(self._encode_values(x.float(), x.dtype), x)

    def decode_float(self, p: Payload) -> torch.Tensor:
        """The dequantised values of p, float32."""
        return self._decode_values(p.tensors, p.shape, p.dtype)

    def decode(self, p: Payload) -> torch.Tensor:
        """The decoded tensor, in the coded tensor's shape and dtype."""
        backend = _fused_backend(self.name, p.tensors[0])
        if backend is not None:
            return backend.decode(self, p)
        return to_dtype(self.decode_float(p), p.dtype)

    # --- residual coding ----------------------------------------------------------------------
    def encode_residual(self, x: torch.Tensor, base: torch.Tensor, error_feedback: bool = True) -> Payload:
        """Code r = x - base; then base <- base + deq(payload) (error feedback) or base <- x, in place."""
        _check_tensor(x, self.name)
        _check_base(x, base)
        backend = _fused_backend(self.name, x)
        if backend is not None:
            return backend.encode_residual(self, x, base, error_feedback)
        r = x.to(torch.float32, copy=True)  # copy: x.float() would alias a float32 x
        r.sub_(base)  # computed in float32: the same bits as x.float() - base.float()
        p = self._payload(self._encode_values(r, x.dtype), x)
        del r
        if error_feedback:
            self.decode_residual(p, base)
        else:
            base.copy_(x)
        return p

    def decode_residual(self, p: Payload, base: torch.Tensor) -> None:
        """Receiver update: base <- base + deq(p), in place (the sender does exactly the same)."""
        if tuple(base.shape) != tuple(p.shape) or base.dtype != p.dtype:
            raise ValueError(
                f"{self.name}: cache {tuple(base.shape)} {base.dtype} does not match payload "
                f"{tuple(p.shape)} {p.dtype}; reset the channel"
            )
        backend = _fused_backend(self.name, base)
        if backend is not None:
            backend.decode_residual(self, p, base)
            return
        total = self.decode_float(p) + base  # promoted to float32: the bits of base.float() + deq
        base.copy_(saturate_(total, base.dtype))

    def _payload(self, tensors: tuple, x: torch.Tensor) -> Payload:
        return Payload(tensors=tuple(t.contiguous() for t in tensors), shape=tuple(x.shape), dtype=x.dtype, codec=self.name)

    def __repr__(self) -> str:
        return f"<codec {self.name}>"


def _fused_backend(name: str, x: torch.Tensor):
    """The fused module that takes this call, or None: the torch reference runs.

    CUDA tensors (and CPU ones under Triton's interpreter, TRITON_INTERPRET=1): `codecs.fused`
    (Triton) when triton imports. Other CPU tensors, with CFX_CPU_KERNELS=1: `codecs.cpu`
    (numba-compiled) once its kernels are compiled (the first call starts that in the background). None when
    CFX_FORCE_TORCH=1, for codecs without fused kernels, or where the backend is unavailable.
    """
    if _force_torch():
        return None
    if x.is_cpu and not _interpreting():
        if not envs.flag(envs.CPU_KERNELS):  # opt-in until the switch-over cannot change a payload mid-run
            return None
        cpu = _cpu_backend()
        return cpu if cpu is not None and cpu.takes(name, x) else None
    try:
        from . import fused
    except ImportError:
        return None
    supports = getattr(fused, "supports", None)
    return fused if supports is not None and supports(name, x) else None


_CPU_BACKEND = []


def _cpu_backend():
    """codecs.cpu, imported once (None if it cannot be imported)."""
    if not _CPU_BACKEND:
        try:
            from . import cpu
        except ImportError:
            cpu = None
        _CPU_BACKEND.append(cpu)
    return _CPU_BACKEND[0]


def _fused_supports(name: str, x: torch.Tensor) -> bool:
    """Whether a fused path (Triton on CUDA, numba on CPU) takes this call (see `_fused_backend`)."""
    return _fused_backend(name, x) is not None


def _force_torch() -> bool:
    return envs.flag(envs.FORCE_TORCH)


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _check_shape(shape) -> tuple:
    shape = tuple(int(s) for s in shape)
    if len(shape) != 2 or shape[0] < 1 or shape[1] < 1:
        raise ValueError(f"codecs take a 2-D shape (N tokens, C channels) with N, C >= 1; got {shape}")
    return shape


def _check_tensor(x: torch.Tensor, name: str) -> None:
    if x.dim() != 2:
        raise ValueError(
            f"{name}: expected a 2-D tensor (N tokens, C channels), got shape {tuple(x.shape)}; "
            "reshape it first, e.g. x.reshape(-1, x.shape[-1])"
        )
    _check_shape(x.shape)
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name}: expected float16, bfloat16 or float32, got {x.dtype}")


def bf16_round(v: torch.Tensor) -> torch.Tensor:
    """Round float32 to the nearest bfloat16 (ties to even), returned as float32."""
    return v.to(torch.bfloat16).float()
