"""Fused kernels for the row-scaled codecs int8, int4 and int2 (docs/codec_format.md).

One program handles one whole row: it reads x (and the base cache), reduces the row's scale,
quantises, packs the codes, writes the payload and updates the cache in place, in one launch.
Rows longer than one block are walked in chunks (a reduction pass, then a coding pass).
"""
import torch
import triton
import triton.language as tl

from ._jit import bf16_round, div_rn_by_scale, exact_fma_available, load_f32, rint, store_as

MAX_BLOCK_ELEMS = 4096  # elements of a row held by one program at a time


class RowCodecSpec:
    """Static description of a row-scaled codec: bits per element and its quantiser."""

    def __init__(self, bits, qmax, mean_step):
        self.bits = bits
        self.per_byte = 8 // bits
        self.qmax = qmax            # absmax codecs: q in [-qmax, qmax], code = q + qmax + 1
        self.mean_step = mean_step  # int2: step from the mean |x|, q in [-2, 1], code = q + 2
        self.offset = 2 if mean_step else qmax + 1

    def row_bytes(self, C):
        return -(-C // self.per_byte)


ROW_CODECS = {
    "int8": RowCodecSpec(8, 127, False),
    "int4": RowCodecSpec(4, 7, False),
    "int2": RowCodecSpec(2, 0, True),
}

_OUT_KIND = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@triton.jit
def _load_r(x_ptr, base_ptr, row_off, cols, mask, RESIDUAL: tl.constexpr):
    x = load_f32(x_ptr + row_off + cols, mask)
    if RESIDUAL:
        return x - load_f32(base_ptr + row_off + cols, mask)
    else:
        return x


@triton.jit
def _reduce_row(acc, MEAN_STEP: tl.constexpr):
    if MEAN_STEP:
        return tl.sum(tl.sum(acc, axis=1), axis=0)
    else:
        return tl.max(tl.max(acc, axis=1), axis=0)


@triton.jit
def _code_chunk(r, scale, cols, mask, QMAX: tl.constexpr, OFFSET: tl.constexpr,
                MEAN_STEP: tl.constexpr, FAST_DIV: tl.constexpr):
    """Integer q of every element (0 where masked or where the scale is 0), and its code."""
    positive = scale > 0
    v = div_rn_by_scale(r, tl.where(positive, scale, 1.0), FAST_DIV)
    if MEAN_STEP:
        q = tl.minimum(tl.maximum(tl.floor(v), -2.0), 1.0)
    else:
        v = tl.minimum(tl.maximum(v, -QMAX - 1.0), QMAX + 1.0)
        q = tl.minimum(tl.maximum(rint(v), -QMAX * 1.0), QMAX * 1.0)
    qi = tl.where(mask, tl.where(positive, q, 0.0), 0.0).to(tl.int32)
    code = tl.where(mask, qi + OFFSET, 0)
    return qi, code


@triton.jit
def _deq(qi, scale, MEAN_STEP: tl.constexpr):
    if MEAN_STEP:
        return (qi.to(tl.float32) + 0.5) * scale
    else:
        return qi.to(tl.float32) * scale


@triton.jit
def _row_encode_kernel(
    x_ptr, base_ptr, data_ptr, scale_ptr, C, C_f, B,
    BITS: tl.constexpr, K: tl.constexpr, QMAX: tl.constexpr, OFFSET: tl.constexpr,
    MEAN_STEP: tl.constexpr, RESIDUAL: tl.constexpr, EF: tl.constexpr, OUT_KIND: tl.constexpr,
    BLOCK_B: tl.constexpr, NUM_CHUNKS: tl.constexpr, FAST_DIV: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_off = row * C
    jb = tl.arange(0, BLOCK_B)
    jk = tl.arange(0, K)
    shifts = (jk * BITS)[None, :]

    # Pass 1: the row's scale (absmax or mean |r|). A row that fits one block stays in registers.
    if NUM_CHUNKS == 1:
        cols = jb[:, None] * K + jk[None, :]
        mask = cols < C
        x = load_f32(x_ptr + row_off + cols, mask)
        if RESIDUAL:
            b = load_f32(base_ptr + row_off + cols, mask)
            r = x - b
        else:
            r = x
        stat = _reduce_row(tl.abs(r), MEAN_STEP)
    else:
        acc = tl.zeros((BLOCK_B, K), dtype=tl.float32)
        for i in range(NUM_CHUNKS):
            cols = (i * BLOCK_B + jb)[:, None] * K + jk[None, :]
            mask = cols < C
            a = tl.abs(_load_r(x_ptr, base_ptr, row_off, cols, mask, RESIDUAL))
            if MEAN_STEP:
                acc = acc + a
            else:
                acc = tl.maximum(acc, a)
        stat = _reduce_row(acc, MEAN_STEP)
    if MEAN_STEP:
        scale = bf16_round(tl.math.div_rn(stat, C_f) * 1.25)
    else:
        scale = bf16_round(tl.math.div_rn(stat, QMAX * 1.0))
    tl.store(scale_ptr + row, scale.to(tl.bfloat16))

    # Pass 2: quantise, pack, update the cache.
    for i in range(NUM_CHUNKS):
        jbi = i * BLOCK_B + jb
        cols = jbi[:, None] * K + jk[None, :]
        mask = cols < C
        if NUM_CHUNKS != 1:
            x = load_f32(x_ptr + row_off + cols, mask)
            if RESIDUAL:
                b = load_f32(base_ptr + row_off + cols, mask)
                r = x - b
            else:
                r = x
        qi, code = _code_chunk(r, scale, cols, mask, QMAX, OFFSET, MEAN_STEP, FAST_DIV)
        packed = tl.sum(code << shifts, axis=1)
        tl.store(data_ptr + row * B + jbi, packed.to(tl.uint8), mask=jbi < B)
        if RESIDUAL:
            if EF:
                # base.float() + deq, then cast: the receiver's update, computed from the codes.
                store_as(base_ptr + row_off + cols, b + _deq(qi, scale, MEAN_STEP), mask, OUT_KIND)
            else:
                store_as(base_ptr + row_off + cols, x, mask, OUT_KIND)  # exact: x came from OUT_KIND


@triton.jit
def _row_decode_kernel(
    data_ptr, scale_ptr, out_ptr, C, B,
    BITS: tl.constexpr, K: tl.constexpr, OFFSET: tl.constexpr, MEAN_STEP: tl.constexpr,
    RESIDUAL: tl.constexpr, OUT_KIND: tl.constexpr, BLOCK_B: tl.constexpr,
    NUM_CHUNKS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_off = row * C
    jb = tl.arange(0, BLOCK_B)
    jk = tl.arange(0, K)
    shifts = (jk * BITS)[None, :]
    scale = tl.load(scale_ptr + row).to(tl.float32)
    for i in range(NUM_CHUNKS):
        jbi = i * BLOCK_B + jb
        cols = jbi[:, None] * K + jk[None, :]
        mask = cols < C
        packed = tl.load(data_ptr + row * B + jbi, mask=jbi < B, other=0).to(tl.int32)
        qi = ((packed[:, None] >> shifts) & ((1 << BITS) - 1)) - OFFSET
        deq = _deq(qi, scale, MEAN_STEP)
        if RESIDUAL:
            deq = load_f32(out_ptr + row_off + cols, mask) + deq
        store_as(out_ptr + row_off + cols, deq, mask, OUT_KIND)


def _blocking(C, per_byte):
    row_bytes = -(-C // per_byte)
    block_b = min(triton.next_power_of_2(row_bytes), MAX_BLOCK_ELEMS // per_byte)
    return block_b, -(-row_bytes // block_b)


def _num_warps(block_b, per_byte):
    elems = block_b * per_byte
    return 8 if elems >= 4096 else 4 if elems >= 1024 else 2 if elems >= 256 else 1


def row_encode(name, x, base=None, error_feedback=True, num_warps=None):
    """Code x (plain, base None) or x - base (residual; base updated in place).

    Returns (data uint8 (N, B), scale bf16 (N,)). num_warps overrides the launch default.
    """
    spec = ROW_CODECS[name]
    N, C = x.shape
    B = spec.row_bytes(C)
    data = torch.empty((N, B), dtype=torch.uint8, device=x.device)
    scale = torch.empty((N,), dtype=torch.bfloat16, device=x.device)
    if N == 0:
        return data, scale
    block_b, chunks = _blocking(C, spec.per_byte)
    residual = base is not None
    _row_encode_kernel[(N,)](
        x, base if residual else x, data, scale, C, float(C), B,
        BITS=spec.bits, K=spec.per_byte, QMAX=spec.qmax, OFFSET=spec.offset,
        MEAN_STEP=spec.mean_step, RESIDUAL=residual, EF=bool(error_feedback),
        OUT_KIND=_OUT_KIND[x.dtype], BLOCK_B=block_b, NUM_CHUNKS=chunks,
        FAST_DIV=exact_fma_available(), num_warps=num_warps or _num_warps(block_b, spec.per_byte),
        enable_fp_fusion=False,
    )
    return data, scale


def row_decode(name, data, scale, shape, dtype, base=None, num_warps=None):
    """Dequantise into a new tensor of `dtype` (plain) or add into `base` in place (residual)."""
    spec = ROW_CODECS[name]
    N, C = shape
    out = base if base is not None else torch.empty((N, C), dtype=dtype, device=data.device)
    if N == 0:
        return out
    block_b, chunks = _blocking(C, spec.per_byte)
    _row_decode_kernel[(N,)](
        data, scale, out, C, spec.row_bytes(C),
        BITS=spec.bits, K=spec.per_byte, OFFSET=spec.offset, MEAN_STEP=spec.mean_step,
        RESIDUAL=base is not None, OUT_KIND=_OUT_KIND[out.dtype], BLOCK_B=block_b,
        NUM_CHUNKS=chunks, num_warps=num_warps or _num_warps(block_b, spec.per_byte),
        enable_fp_fusion=False,
    )
    return out
