"""Payload and the Codec base class: the torch reference arithmetic of docs/codec_format.md."""

from __future__ import annotations

import math

import torch

from compactfusion_xdit import envs
from compactfusion_xdit.codecs.payload import Payload
from compactfusion_xdit.codecs.payload import check_base as _check_base

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: ``backend=`` default of the block calls: decide per call (`Codec.block_backend`).
AUTO = object()


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
    (`compactfusion_xdit.codecs.cpu`, on by default).

        c = codecs.get("int4"); p = c.encode(x); y = c.decode(p)      # plain
        p = c.encode_residual(x, base)   # sender: codes x - base, base <- reconstruction
        c.decode_residual(p, base)       # receiver: base <- base + deq(p), bitwise like the sender
    """

    name = "codec"
    #: True when each row's payload and reconstruction depend on that row alone (per-row scales):
    #: coding a stack of same-shaped tensors in one call then gives each tensor's own bytes and
    #: caches, so a channel may batch several messages into one codec call.
    rows_independent = False
    #: Index in `layout` of a tensor with one entry (or row) per coded row whose NaN marks a row that
    #: was not finite at the sender (`encode_block`); None: the codec cannot mark rows. A row of zeros
    #: must code to a marker of 0 and decode to exact zeros, so that a receiver that zeroes the marker
    #: reproduces the sender's cache update.
    row_marker: int | None = None

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

    # --- messages in wire buffers -------------------------------------------------------------
    def block_backend(self, x3: torch.Tensor):
        """What codes (L, N, C) blocks like x3 in this process: the compiled module, or None for the
        torch reference. A caller that codes the same blocks every step may decide once and pass
        it as ``backend=`` to `encode_block` / `decode_block`."""
        return _block_backend(self.name, x3)

    def encode_block(self, x3: torch.Tensor, base3: torch.Tensor | None, wire2: torch.Tensor, offset: int,
                     residual: bool, error_feedback: bool = True, backend=AUTO):
        """Code x3[l] (L, N, C) into wire2[l, offset:offset + payload_nbytes((N, C))] for every l.

        residual: codes x3[l] - base3[l] and updates the cache base3[l] like `encode_residual`;
        plain: codes x3[l] (base3 unused). A row holding NaN/Inf is coded as a zero residual (plain:
        zeros), so its cache row keeps its value, and its marker (`row_marker`) is set to NaN.
        Returns the number of such rows (an int, or a 0-d tensor on x3's device: no host sync).
        The compiled CPU kernels take the call when they can (same bytes and caches).
        """
        if backend is AUTO:
            backend = _block_backend(self.name, x3)
        if backend is not None:
            return backend.encode_block(self.name, x3, base3, wire2, offset, -1, residual, error_feedback)
        L, N, C = x3.shape
        x2 = x3.reshape(L * N, C)
        bad = ~torch.isfinite(x2).all(dim=1)
        base2 = base3.view(L * N, C) if residual else None
        for l0, l1 in self._message_groups(L):
            rows = slice(l0 * N, l1 * N)
            xg, badg = x2[rows], bad[rows, None]
            if residual:
                bg = base2[rows]
                p = self.encode_residual(torch.where(badg, bg, xg), bg, error_feedback)
            else:
                p = self.encode(xg.masked_fill(badg, 0))
            if self.row_marker is not None:
                marker = p.tensors[self.row_marker]
                marker.masked_fill_(bad[rows].view(-1, *([1] * (marker.dim() - 1))), float("nan"))
            pos = offset
            for t in p.tensors:
                part = t.reshape(l1 - l0, -1).view(torch.uint8)
                wire2[l0:l1, pos:pos + part.shape[1]].copy_(part)
                pos += part.shape[1]
        return bad.sum()

    def decode_block(self, wire2: torch.Tensor, offset: int, base3: torch.Tensor | None, out3: torch.Tensor,
                     residual: bool, backend=AUTO) -> None:
        """The receiving side of `encode_block`: out3[l] <- what wire2[l, offset:...] codes.

        residual: base3[l] <- base3[l] + deq (in place, bitwise like the sender) and out3[l] <- it;
        plain: out3[l] <- deq. Rows marked non-finite keep their cache value and come out as NaN.
        """
        if backend is AUTO:
            backend = _block_backend(self.name, out3)
        if backend is not None:
            backend.decode_block(self.name, wire2, offset, base3, out3, -1, residual)
            return
        L, N, C = out3.shape
        dtype = out3.dtype
        base2 = base3.view(L * N, C) if residual else None
        out2 = out3.view(L * N, C)
        for l0, l1 in self._message_groups(L):
            count, rows, pos, tensors = l1 - l0, slice(l0 * N, l1 * N), offset, []
            for s, d in self.layout((N, C), dtype):
                size = math.prod(s) * d.itemsize
                block = wire2[l0:l1, pos:pos + size].clone(memory_format=torch.contiguous_format)  # aligned, ours to unmark
                tensors.append(block.view(d).reshape(count * s[0], *s[1:]))
                pos += size
            p = Payload(tensors=tuple(tensors), shape=(count * N, C), dtype=dtype, codec=self.name)
            bad = None
            if self.row_marker is not None:
                marker = tensors[self.row_marker]
                bad = marker.isnan() if marker.dim() == 1 else marker.isnan().any(dim=1)
                marker.masked_fill_(bad.view(-1, *([1] * (marker.dim() - 1))), 0.0)
            if residual:
                self.decode_residual(p, base2[rows])
                out2[rows].copy_(base2[rows])
            else:
                out2[rows].copy_(self.decode(p))
            if bad is not None:
                out2[rows].masked_fill_(bad[:, None], float("nan"))

    def prepare_block(self, links: int, start: int, shape2: tuple[int, int], dtype: torch.dtype,
                      base3: torch.Tensor | None, wire2: torch.Tensor, offset: int, residual: bool,
                      error_feedback: bool = True, backend=AUTO):
        """`encode_block` / `decode_block` of fixed links, prepared once: the returned object's
        ``encode(x)`` codes links ``start .. start + links - 1`` of x (contiguous, viewed as
        (W, *shape2)) into `wire2` at `offset` (caches `base3`), ``decode(out)`` decodes them into
        out. The compiled CPU path then costs one pointer per call; the torch path makes views."""
        if backend is AUTO:
            backend = _block_backend(self.name, wire2.new_empty((0, 1, 1), dtype=dtype))
        if backend is not None:
            return backend.PreparedBlock(self.name, links, start, *shape2, dtype, base3, wire2, offset, residual,
                                         error_feedback)
        return _TorchBlock(self, links, start, shape2, base3, wire2, offset, residual, error_feedback)

    def _message_groups(self, count: int) -> list[tuple[int, int]]:
        """Ranges of messages coded by one codec call: all at once when rows code independently."""
        return [(0, count)] if self.rows_independent else [(i, i + 1) for i in range(count)]

    def _payload(self, tensors: tuple, x: torch.Tensor) -> Payload:
        return Payload(tensors=tuple(t.contiguous() for t in tensors), shape=tuple(x.shape), dtype=x.dtype, codec=self.name)

    def __repr__(self) -> str:
        return f"<codec {self.name}>"


class _TorchBlock:
    """`Codec.prepare_block` on the torch path: views of x / out, then the block calls."""

    def __init__(self, codec, links, start, shape2, base3, wire2, offset, residual, error_feedback) -> None:
        self.codec, self.rows, self.shape2 = codec, slice(start, start + links), tuple(shape2)
        self.base3, self.wire2, self.offset = base3, wire2, offset
        self.residual, self.error_feedback = residual, error_feedback

    def encode(self, x: torch.Tensor):
        x3 = x.view(-1, *self.shape2)[self.rows]
        return self.codec.encode_block(x3, self.base3, self.wire2, self.offset, self.residual, self.error_feedback,
                                       backend=None)

    def decode(self, out: torch.Tensor) -> None:
        out3 = out.view(-1, *self.shape2)[self.rows]
        self.codec.decode_block(self.wire2, self.offset, self.base3, out3, self.residual, backend=None)


def _block_backend(name: str, x3: torch.Tensor):
    """The module that takes block calls for this codec and (L, N, C) tensor: `_fused_backend`'s
    choice when it has block kernels (the compiled CPU one; Triton has none yet), else None."""
    backend = _fused_backend(name, x3) if x3.dim() == 3 else None
    return backend if backend is not None and hasattr(backend, "PreparedBlock") else None


def _fused_backend(name: str, x: torch.Tensor):
    """The fused module that takes this call, or None: the torch reference runs.

    CUDA tensors (and CPU ones under Triton's interpreter, TRITON_INTERPRET=1): `codecs.fused`
    (Triton) when triton imports. Other CPU tensors: `codecs.cpu` (numba-compiled) when this
    process decided for it at its first call (see `codecs.cpu._loader`; CFX_CPU_KERNELS=0 turns it
    off). None when CFX_FORCE_TORCH=1, for codecs without fused kernels, or where the backend is
    unavailable.
    """
    if _force_torch():
        return None
    if x.is_cpu and not _interpreting():
        if envs.get(envs.CPU_KERNELS) == "0":
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
