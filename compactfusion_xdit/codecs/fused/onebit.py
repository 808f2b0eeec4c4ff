"""Fused kernels for the 1bit codec (sign with rank-1 magnitude, docs/codec_format.md).

The channel means m[c] need all N rows before any row can be coded, so the encoder runs three
launches: (1) per tile of rows x columns, the tile's column sums and row sums of |r|; (2) per
block of columns, m[c] (bf16, written straight into the payload) and the block's total; (3) per
row, tt[n] (its row sums), tbar (from the block totals), t[n], the sign bits, the packed bytes and
the cache update. The decoder is one launch. All sums run in a fixed order (deterministic), not
torch's: m and t match the torch reference to within one bf16 ulp, almost always exactly.
Workspace: (ceil(N / STAT_BLOCK_N) + 1) x C + ceil(C / STAT_BLOCK_C) x N float32 (3 % of an fp16 x).
"""
import torch
import triton
import triton.language as tl

from ._jit import bf16_round, load_f32, store_as

STAT_BLOCK_N = 32     # rows per statistics tile
STAT_BLOCK_C = 128    # columns per statistics tile (and per finalize program)
FIN_BLOCK_P = 32      # row tiles summed per step in the finalize pass
MAX_BLOCK_BYTES = 512  # packed bytes (8 elements each) per program step when coding a row

_OUT_KIND = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@triton.jit
def _stats_kernel(x_ptr, base_ptr, colpart_ptr, rowpart_ptr, N, C, RESIDUAL: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows < N)[:, None] & (cols < C)[None, :]
    offs = rows[:, None] * C + cols[None, :]
    r = load_f32(x_ptr + offs, mask)
    if RESIDUAL:
        r = r - load_f32(base_ptr + offs, mask)
    a = tl.abs(r)
    tl.store(colpart_ptr + pid_n.to(tl.int64) * C + cols, tl.sum(a, axis=0), mask=cols < C)
    tl.store(rowpart_ptr + pid_c.to(tl.int64) * N + rows, tl.sum(a, axis=1), mask=rows < N)


@triton.jit
def _finalize_kernel(colpart_ptr, m_ptr, total_ptr, N_f, C, P,
                     BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    pid = tl.program_id(0)
    cols = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    pj = tl.arange(0, BLOCK_P)
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    p0 = 0
    while p0 < P:  # a while loop: runtime bounds work the same in the interpreter
        ps = p0 + pj
        mask = (ps < P)[:, None] & (cols < C)[None, :]
        acc = acc + load_f32(colpart_ptr + ps.to(tl.int64)[:, None] * C + cols[None, :], mask)
        p0 += BLOCK_P
    colsum = tl.sum(acc, axis=0)
    m = bf16_round(tl.math.div_rn(colsum, N_f))
    tl.store(m_ptr + cols, m.to(tl.bfloat16), mask=cols < C)
    tl.store(total_ptr + pid, tl.sum(colsum, axis=0))


@triton.jit
def _signed_magnitude(bits, m, t):
    mag = m * t
    return tl.where(bits != 0, mag, -mag)


@triton.jit
def _code_kernel(x_ptr, base_ptr, data_ptr, m_ptr, t_ptr, rowpart_ptr, total_ptr, N, C, B,
                 C_f, N_f, RESIDUAL: tl.constexpr, EF: tl.constexpr, OUT_KIND: tl.constexpr,
                 BLOCK_B: tl.constexpr, NUM_CHUNKS: tl.constexpr, NUM_CB: tl.constexpr,
                 BLOCK_CB: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    row_off = row * C
    cb = tl.arange(0, BLOCK_CB)
    # tt = mean_c |r|, tbar = mean_n tt (= total / C / N), from the statistics pass's partials.
    row_sum = tl.sum(load_f32(rowpart_ptr + cb.to(tl.int64) * N + row, cb < NUM_CB), axis=0)
    tt = tl.math.div_rn(row_sum, C_f)
    total = tl.sum(load_f32(total_ptr + cb, cb < NUM_CB), axis=0)
    tbar = tl.math.div_rn(tl.math.div_rn(total, C_f), N_f)
    t = bf16_round(tl.where(tbar > 0, tl.math.div_rn(tt, tl.where(tbar > 0, tbar, 1.0)), 0.0))
    tl.store(t_ptr + row, t.to(tl.bfloat16))
    jb = tl.arange(0, BLOCK_B)
    jk = tl.arange(0, 8)
    for i in range(NUM_CHUNKS):
        jbi = i * BLOCK_B + jb
        cols = jbi[:, None] * 8 + jk[None, :]
        mask = cols < C
        x = load_f32(x_ptr + row_off + cols, mask)
        if RESIDUAL:
            b = load_f32(base_ptr + row_off + cols, mask)
            r = x - b
        else:
            r = x
        bits = tl.where(mask & (r >= 0), 1, 0)
        packed = tl.sum(bits << jk[None, :], axis=1)
        tl.store(data_ptr + row * B + jbi, packed.to(tl.uint8), mask=jbi < B)
        if RESIDUAL:
            if EF:
                m = load_f32(m_ptr + cols, mask)
                store_as(base_ptr + row_off + cols, b + _signed_magnitude(bits, m, t), mask,
                         OUT_KIND)
            else:
                store_as(base_ptr + row_off + cols, x, mask, OUT_KIND)  # exact round trip


@triton.jit
def _decode_kernel(data_ptr, m_ptr, t_ptr, out_ptr, C, B, RESIDUAL: tl.constexpr,
                   OUT_KIND: tl.constexpr, BLOCK_B: tl.constexpr, NUM_CHUNKS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    row_off = row * C
    t = tl.load(t_ptr + row).to(tl.float32)
    jb = tl.arange(0, BLOCK_B)
    jk = tl.arange(0, 8)
    for i in range(NUM_CHUNKS):
        jbi = i * BLOCK_B + jb
        cols = jbi[:, None] * 8 + jk[None, :]
        mask = cols < C
        packed = tl.load(data_ptr + row * B + jbi, mask=jbi < B, other=0).to(tl.int32)
        bits = (packed[:, None] >> jk[None, :]) & 1
        deq = _signed_magnitude(bits, load_f32(m_ptr + cols, mask), t)
        if RESIDUAL:
            deq = load_f32(out_ptr + row_off + cols, mask) + deq
        store_as(out_ptr + row_off + cols, deq, mask, OUT_KIND)


def _blocking(C):
    row_bytes = -(-C // 8)
    block_b = min(triton.next_power_of_2(row_bytes), MAX_BLOCK_BYTES)
    return row_bytes, block_b, -(-row_bytes // block_b)


def _num_warps(block_b):
    return max(1, min(8, block_b * 8 // 512))


def onebit_encode(x, base=None, error_feedback=True):
    """Code x (plain) or x - base (residual; base updated in place).

    Returns (data uint8 (N, ceil(C/8)), m bf16 (C,), t bf16 (N,)).
    """
    N, C = x.shape
    B, block_b, chunks = _blocking(C)
    dev = x.device
    data = torch.empty((N, B), dtype=torch.uint8, device=dev)
    m = torch.empty((C,), dtype=torch.bfloat16, device=dev)
    t = torch.empty((N,), dtype=torch.bfloat16, device=dev)
    if N == 0:
        return data, m, t
    residual = base is not None
    base_arg = base if residual else x
    n_tiles, n_cb = triton.cdiv(N, STAT_BLOCK_N), triton.cdiv(C, STAT_BLOCK_C)
    colpart = torch.empty((n_tiles, C), dtype=torch.float32, device=dev)
    rowpart = torch.empty((n_cb, N), dtype=torch.float32, device=dev)
    total = torch.empty((n_cb,), dtype=torch.float32, device=dev)
    _stats_kernel[(n_tiles, n_cb)](x, base_arg, colpart, rowpart, N, C, RESIDUAL=residual,
                                   BLOCK_N=STAT_BLOCK_N, BLOCK_C=STAT_BLOCK_C, num_warps=4,
                                   enable_fp_fusion=False)
    _finalize_kernel[(n_cb,)](colpart, m, total, float(N), C, n_tiles, BLOCK_C=STAT_BLOCK_C,
                              BLOCK_P=FIN_BLOCK_P, num_warps=4, enable_fp_fusion=False)
    _code_kernel[(N,)](x, base_arg, data, m, t, rowpart, total, N, C, B, float(C), float(N),
                       RESIDUAL=residual, EF=bool(error_feedback), OUT_KIND=_OUT_KIND[x.dtype],
                       BLOCK_B=block_b, NUM_CHUNKS=chunks, NUM_CB=n_cb,
                       BLOCK_CB=triton.next_power_of_2(n_cb), num_warps=_num_warps(block_b),
                       enable_fp_fusion=False)
    return data, m, t


def onebit_decode(data, m, t, shape, dtype, base=None):
    """Dequantise into a new tensor of `dtype` (plain) or add into `base` in place (residual)."""
    N, C = shape
    out = base if base is not None else torch.empty((N, C), dtype=dtype, device=data.device)
    if N == 0:
        return out
    B, block_b, chunks = _blocking(C)
    _decode_kernel[(N,)](data, m, t, out, C, B, RESIDUAL=base is not None,
                         OUT_KIND=_OUT_KIND[out.dtype], BLOCK_B=block_b, NUM_CHUNKS=chunks,
                         num_warps=_num_warps(block_b), enable_fp_fusion=False)
    return out
