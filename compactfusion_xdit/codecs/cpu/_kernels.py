"""Numba kernels of the CPU codec path: the arithmetic of docs/codec_format.md, one call per coding.

Compiled with nopython, no fastmath and the numpy error model (IEEE division, no Python
exceptions on 0/0), so LLVM neither contracts a multiply and an add into an FMA nor reassociates:
every float32 operation below rounds once, as written. Constants are np.float32 so that no float64
sneaks into the arithmetic (a float32 op with a Python float would be done in float64); the only
float64 values are the accumulators of the sums (int2's mean |r|, 1bit's means), which the format
allows to be summed in any order (a documented bound, not bits).

16-bit tensors arrive as their bits (numba has no float16/bfloat16 on the CPU): float16 as uint16,
bfloat16 as int16 arrays, so that every kernel is specialised per dtype at compile time and its row
loops carry no dtype branch. Conversions are integer bit manipulation:
- bf16 -> f32: bits << 16 (exact); f32 -> bf16: round to nearest even, NaN -> 0xFFFF (what
  torch's vectorised CPU conversion writes; its scalar path writes 0x7FC0: both are NaN).
- f16 -> f32: exact (normals, subnormals, inf, NaN payload kept); f32 -> f16: round to nearest
  even, overflow -> inf, NaN -> quiet NaN with its sign and the top payload bits (as F16C does).
Caches are saturated to the dtype's largest finite value before the cast (the codecs' `to_dtype`).

Each encode/decode is one call that walks the rows: per row it converts x (and the cache) to
float32 in a row buffer, reduces the row's scale, codes, packs, and updates the cache row in
place, while the row is in L1. 1bit needs all rows for its channel means: a statistics pass over
the rows, then the coding pass.
"""
import numpy as np
from llvmlite import ir
from numba import carray, njit, types
from numba.extending import intrinsic, overload

_JIT = dict(nogil=True, cache=True, fastmath=False, error_model="numpy", boundscheck=False)
_INLINE = dict(_JIT, inline="always")  # per-element helpers: inlined in numba IR so loops vectorise

F32_ZERO = np.float32(0.0)
F32_HALF = np.float32(0.5)
F32_ONE = np.float32(1.0)
F32_1P25 = np.float32(1.25)
RINT_MAGIC = np.float32(12582912.0)  # 1.5 * 2**23: (v + M) - M rounds |v| < 2**22 half to even
FP16_MAX = np.float32(65504.0)
BF16_MAX = np.float32(3.3895313892515355e38)
U16_NAN_BF16 = np.uint16(0xFFFF)


@intrinsic
def f32_bits(typingctx, v):
    """The IEEE bits of a float32, as uint32."""
    if v != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


@intrinsic
def f32_from_bits(typingctx, u):
    """The float32 whose IEEE bits are the low 32 bits of integer u (numba widens integer
    arithmetic to 64 bits, so u may be any integer type)."""
    if not isinstance(u, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        v = args[0]
        width = signature.args[0].bitwidth
        if width > 32:
            v = builder.trunc(v, ir.IntType(32))
        elif width < 32:
            v = builder.zext(v, ir.IntType(32))
        return builder.bitcast(v, ir.FloatType())

    return types.float32(u), codegen


# ---- scalar conversions ------------------------------------------------------------------------

@njit(**_INLINE)
def bf16_bits(v):
    """float32 -> bfloat16 bits (round to nearest even; NaN -> 0xFFFF)."""
    if v != v:
        return U16_NAN_BF16
    u = f32_bits(v)
    return np.uint16((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))


@njit(**_INLINE)
def bf16_to_f32(h):
    return f32_from_bits(np.uint32(np.uint16(h)) << np.uint32(16))


@njit(**_INLINE)
def bf16_round(v):
    """float32 -> the nearest bfloat16 value as float32 (NaN stays NaN)."""
    if v != v:
        return v
    u = f32_bits(v)
    return f32_from_bits((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000))


@njit(**_INLINE)
def f16_to_f32(h):
    """float16 bits -> float32 (exact). Every case is computed and one is selected, so that row
    loops with this conversion stay branch-free and vectorise."""
    h32 = np.uint32(h)
    sign = (h32 & np.uint32(0x8000)) << np.uint32(16)
    em = h32 & np.uint32(0x7FFF)
    # inf / NaN: exponent all ones, payload shifted up
    special = sign | np.uint32(0x7F800000) | ((em & np.uint32(0x3FF)) << np.uint32(13))
    # normal: rebias the exponent (127 - 15 = 112)
    normal = sign | ((em << np.uint32(13)) + np.uint32(0x38000000))
    # zero / subnormal: em * 2**-24, exact in float32
    small = sign | f32_bits(np.float32(np.int32(em)) * np.float32(5.9604644775390625e-08))
    u = normal if em >= np.uint32(0x0400) else small
    u = special if em >= np.uint32(0x7C00) else u
    return f32_from_bits(u)


@njit(**_INLINE)
def f16_bits(v):
    """float32 -> float16 bits (round to nearest even; >= 65520 -> inf; NaN -> quiet NaN), every
    case computed and one selected (see f16_to_f32)."""
    u = f32_bits(v)
    sign = (u >> np.uint32(16)) & np.uint32(0x8000)
    a = u & np.uint32(0x7FFFFFFF)
    # NaN: keep the top payload bits, set the quiet bit
    nan = np.uint32(0x7E00) | ((a >> np.uint32(13)) & np.uint32(0x3FF))
    # a normal float16 (>= 2**-14); wraps harmlessly for smaller a, which the selects drop
    normal = ((a - np.uint32(0x38000000)) + np.uint32(0xFFF) + ((a >> np.uint32(13)) & np.uint32(1))) >> np.uint32(13)
    # subnormal or zero: adding 0.5 (ulp 2**-24) rounds to a multiple of 2**-24, half to even
    small = f32_bits(f32_from_bits(a) + F32_HALF) - np.uint32(0x3F000000)
    h = normal if a >= np.uint32(0x38800000) else small
    h = np.uint32(0x7C00) if a >= np.uint32(0x477FF000) else h  # >= 65520 rounds to inf (and inf itself)
    h = nan if a > np.uint32(0x7F800000) else h
    return np.uint16((h | sign) & np.uint32(0xFFFF))


# ---- element and row conversions -----------------------------------------------------------------

def load_elem(src, n, c):
    """src[n, c] as float32 (src float32, uint16 bits of float16 or int16 bits of bfloat16)."""


def store_elem(dst, n, c, v):
    """dst[n, c] = v cast to dst's dtype, saturated at its largest finite value (NaN kept)."""


@overload(load_elem, jit_options=_JIT)
def _load_elem_impl(src, n, c):
    if src.dtype == types.float32:
        return lambda src, n, c: src[n, c]

    if src.dtype == types.uint16:
        return lambda src, n, c: f16_to_f32(src[n, c])
    return lambda src, n, c: bf16_to_f32(src[n, c])


@overload(store_elem, jit_options=_JIT)
def _store_elem_impl(dst, n, c, v):
    if dst.dtype == types.float32:
        def store_f32(dst, n, c, v):
            dst[n, c] = v
        return store_f32

    if dst.dtype == types.uint16:
        def store_f16(dst, n, c, v):
            v = FP16_MAX if v > FP16_MAX else v
            v = -FP16_MAX if v < -FP16_MAX else v
            dst[n, c] = f16_bits(v)
        return store_f16

    def store_bf16(dst, n, c, v):
        v = BF16_MAX if v > BF16_MAX else v
        v = -BF16_MAX if v < -BF16_MAX else v
        dst[n, c] = np.int16(bf16_bits(v))
    return store_bf16


@njit(**_JIT)
def load_row(src, n, out):
    """out[:C] = row n of src as float32."""
    for c in range(out.shape[0]):
        out[c] = load_elem(src, n, c)


@njit(**_JIT)
def store_row(dst, n, vals):
    """Row n of dst = vals cast to dst's dtype (store_elem)."""
    for c in range(vals.shape[0]):
        store_elem(dst, n, c, vals[c])


@njit(**_JIT)
def _abs_sum(r):
    """sum |r| in float64, eight interleaved partial sums (fixed order, so deterministic)."""
    C = r.shape[0]
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = 0.0
    c = 0
    while c + 8 <= C:
        s0 += abs(r[c])
        s1 += abs(r[c + 1])
        s2 += abs(r[c + 2])
        s3 += abs(r[c + 3])
        s4 += abs(r[c + 4])
        s5 += abs(r[c + 5])
        s6 += abs(r[c + 6])
        s7 += abs(r[c + 7])
        c += 8
    while c < C:
        s0 += abs(r[c])
        c += 1
    return ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))


@njit(**_JIT)
def _pack(codes, bits, data, n):
    """Pack codes[:B*k] (k = 8 // bits, zero-padded) into row n of data, least significant first."""
    _pack_at(codes, bits, data[n], 0, data.shape[1])


@njit(**_JIT)
def _unpack(data, n, bits, codes):
    """Inverse of _pack for row n: codes[:B*k]."""
    _unpack_at(data[n], 0, data.shape[1], bits, codes)


# ---- int8 / int4 / int2 --------------------------------------------------------------------------

@njit(**_INLINE)
def _fold_abs(u, amax, allbits):
    """One element's bits u folded into a row's max |r| as bits (ordered like the value, NaN above
    inf) and the AND of its bits (which says whether every element is -0)."""
    a = u & np.uint32(0x7FFFFFFF)
    return (a if a > amax else amax), allbits & u


@njit(**_INLINE)
def _absmax_scale(amax, allbits, qmax):
    """bf16(max|r| / qmax) as float32, and its bits, from the row's max |r| as bits and the AND of
    its bits; a zero row keeps the sign torch gives it."""
    if amax == np.uint32(0):
        # torch: maximum(max r, -min r) is max r for a zero row: -0 only if every element is -0
        if allbits & np.uint32(0x80000000):
            return np.float32(-0.0), np.uint16(0x8000)
        return F32_ZERO, np.uint16(0)
    s = bf16_round(f32_from_bits(amax) / np.float32(qmax))
    return s, bf16_bits(s)


@njit(**_INLINE)
def _code_of(q, lo, hi, off):
    """clamp(q, lo, hi) + off as a uint8 code; NaN -> 0 (torch's uint8 cast of NaN)."""
    q = hi if q > hi else q
    q = lo if q < lo else q
    q = q if q == q else -off
    return np.uint8(np.int32(q + off))


@njit(**_INLINE)
def _q_absmax(rc, s, fq, lim, off):
    """The code of rc: clamp(rint(rc / s), -qmax, qmax) + offset."""
    v = rc / s
    v = lim if v > lim else v  # |v| under 2**22 for the rint trick; NaN passes through
    v = -lim if v < -lim else v
    return _code_of((v + RINT_MAGIC) - RINT_MAGIC, -fq, fq, off)


@njit(**_INLINE)
def _q_int2(rc, d):
    """The code of rc: clamp(floor(rc / d), -2, 1) + 2."""
    return _code_of(np.floor(rc / d), np.float32(-2.0), F32_ONE, np.float32(2.0))


@njit(**_JIT)
def _row_scale_absmax(r, qmax):
    """_absmax_scale of the row r."""
    amax = np.uint32(0)
    allbits = np.uint32(0xFFFFFFFF)
    for c in range(r.shape[0]):
        amax, allbits = _fold_abs(f32_bits(r[c]), amax, allbits)
    return _absmax_scale(amax, allbits, qmax)


@njit(**_JIT)
def _code_absmax(r, s, qmax, offset, codes):
    """codes[c] = _q_absmax(r[c]); a zero scale codes every element as 0."""
    C = r.shape[0]
    if s == F32_ZERO:  # an all-zero row (or a scale that underflowed): q = 0
        for c in range(C):
            codes[c] = np.uint8(offset)
        return
    fq = np.float32(qmax)
    lim = np.float32(qmax + 1)
    off = np.float32(offset)
    for c in range(C):
        codes[c] = _q_absmax(r[c], s, fq, lim, off)


@njit(**_JIT)
def _code_int2(r, d, codes):
    """codes[c] = _q_int2(r[c]); a zero step codes every element as 0."""
    C = r.shape[0]
    if d == F32_ZERO:
        for c in range(C):
            codes[c] = np.uint8(2)
        return
    for c in range(C):
        codes[c] = _q_int2(r[c], d)


@njit(**_JIT)
def _deq_row(codes, s, offset, mean_step, out):
    """out[c] = deq of codes[c] with scale s (float32): q * s, or (q + 0.5) * d for int2."""
    C = out.shape[0]
    off = np.float32(offset)  # code - offset is exact in float32 (|q| <= 255)
    if mean_step:
        for c in range(C):
            out[c] = ((np.float32(codes[c]) - off) + F32_HALF) * s
    else:
        for c in range(C):
            out[c] = (np.float32(codes[c]) - off) * s


@njit(**_JIT)
def row_encode(x, base, data, scale, bits, residual, ef):
    """Code x (plain) or x - base (residual) with int8/int4 (absmax) or int2 (bits == 2).

    x, base: (N, C) float32, float16 or bfloat16 bits (see above); data (N, B) uint8; scale (N,) uint16 (bf16
    bits). Residual with ef: base <- base + deq in place; without: base <- x."""
    N, C = x.shape
    k = 8 // bits
    B = data.shape[1]
    mean_step = bits == 2
    qmax = (1 << (bits - 1)) - 1
    offset = 2 if mean_step else qmax + 1
    xf = np.empty(C, np.float32)
    bf = np.empty(C, np.float32)
    r = np.empty(C, np.float32)
    codes = np.zeros(B * k, np.uint8)
    cview = codes[:C]
    for n in range(N):
        load_row(x, n, xf)
        if residual:
            load_row(base, n, bf)
            for c in range(C):
                r[c] = xf[c] - bf[c]
        else:
            for c in range(C):
                r[c] = xf[c]
        if mean_step:
            d = bf16_round((np.float32(_abs_sum(r)) / np.float32(C)) * F32_1P25)
            scale[n] = bf16_bits(d)
            _code_int2(r, d, cview)
            s = d
        else:
            s, sbits = _row_scale_absmax(r, qmax)
            scale[n] = sbits
            _code_absmax(r, s, qmax, offset, cview)
        _pack(codes, bits, data, n)
        if residual:
            if ef:
                _deq_row(cview, s, offset, mean_step, r)
                for c in range(C):
                    r[c] = bf[c] + r[c]
                store_row(base, n, r)
            else:
                for c in range(C):
                    base[n, c] = x[n, c]


@njit(**_JIT)
def row_decode(data, scale, out, bits, residual):
    """out <- deq (plain, cast to out's dtype) or out <- out + deq (residual), in place."""
    N, C = out.shape
    k = 8 // bits
    B = data.shape[1]
    mean_step = bits == 2
    qmax = (1 << (bits - 1)) - 1
    offset = 2 if mean_step else qmax + 1
    codes = np.empty(B * k, np.uint8)
    cview = codes[:C]
    v = np.empty(C, np.float32)
    bf = np.empty(C, np.float32)
    for n in range(N):
        _unpack(data, n, bits, codes)
        _deq_row(cview, bf16_to_f32(scale[n]), offset, mean_step, v)
        if residual:
            load_row(out, n, bf)
            for c in range(C):
                v[c] = bf[c] + v[c]
        store_row(out, n, v)


# ---- 1bit ----------------------------------------------------------------------------------------

@njit(**_JIT)
def _signs(r, codes):
    for c in range(r.shape[0]):
        codes[c] = np.uint8(1) if r[c] >= F32_ZERO else np.uint8(0)


@njit(**_JIT)
def _deq_onebit(codes, mf, t, out):
    """out[c] = ±(m[c] · t): the product rounded first, then the sign (exact)."""
    for c in range(out.shape[0]):
        mag = mf[c] * t
        out[c] = mag if codes[c] != np.uint8(0) else -mag


@njit(**_JIT)
def onebit_encode(x, base, data, m, t, residual, ef):
    """1bit coding of x (plain) or x - base (residual): m (C,) and t (N,) as bf16 bits."""
    N, C = x.shape
    B = data.shape[1]
    xf = np.empty(C, np.float32)
    bf = np.empty(C, np.float32)
    r = np.empty(C, np.float32)
    colsum = np.zeros(C, np.float64)
    tt = np.empty(N, np.float32)
    codes = np.zeros(B * 8, np.uint8)
    cview = codes[:C]
    fC = np.float32(C)
    fN = np.float32(N)
    # statistics pass: sum_n |r| per channel, sum_c |r| per token
    ttsum = 0.0
    for n in range(N):
        load_row(x, n, xf)
        if residual:
            load_row(base, n, bf)
            for c in range(C):
                r[c] = xf[c] - bf[c]
        else:
            for c in range(C):
                r[c] = xf[c]
        for c in range(C):
            colsum[c] += abs(r[c])
        tt[n] = np.float32(_abs_sum(r)) / fC
        ttsum += tt[n]
    mf = np.empty(C, np.float32)
    for c in range(C):
        mc = bf16_round(np.float32(colsum[c]) / fN)
        mf[c] = mc
        m[c] = bf16_bits(mc)
    tbar = np.float32(ttsum) / fN
    # coding pass
    for n in range(N):
        if tbar > F32_ZERO:
            tn = bf16_round(tt[n] / tbar)
        else:
            tn = F32_ZERO
        t[n] = bf16_bits(tn)
        load_row(x, n, xf)
        if residual:
            load_row(base, n, bf)
            for c in range(C):
                r[c] = xf[c] - bf[c]
        else:
            for c in range(C):
                r[c] = xf[c]
        _signs(r, cview)
        _pack(codes, 1, data, n)
        if residual:
            if ef:
                _deq_onebit(cview, mf, tn, r)
                for c in range(C):
                    r[c] = bf[c] + r[c]
                store_row(base, n, r)
            else:
                for c in range(C):
                    base[n, c] = x[n, c]


@njit(**_JIT)
def onebit_decode(data, m, t, out, residual):
    N, C = out.shape
    B = data.shape[1]
    codes = np.empty(B * 8, np.uint8)
    cview = codes[:C]
    mf = np.empty(C, np.float32)
    for c in range(C):
        mf[c] = bf16_to_f32(m[c])
    v = np.empty(C, np.float32)
    bf = np.empty(C, np.float32)
    for n in range(N):
        _unpack(data, n, 1, codes)
        _deq_onebit(cview, mf, bf16_to_f32(t[n]), v)
        if residual:
            load_row(out, n, bf)
            for c in range(C):
                v[c] = bf[c] + v[c]
        store_row(out, n, v)


# ---- block kernels: code into / decode out of a (links, bytes) wire buffer -----------------------
#
# wire[l, offset:offset + P] is the message of link l (P = payload_nbytes((N, C), dtype)): the
# packed rows (N x B bytes), then the scales as little-endian bf16 bytes, int8/int4/int2: s (N,);
# 1bit: m (C,) then t (N,). offset may be odd, so scales are written and read byte by byte.
# Per message the arithmetic is that of row_encode / onebit_encode above (the same helpers, in
# the same order), with one addition: a row of x holding a NaN or an infinity is coded as a zero
# residual and its scale (1bit: t) bytes are then replaced by the bf16 quiet NaN 0x7FC0. The
# receiver decodes such a row with scale +0.0 (caches stay equal and finite) and writes NaN to
# its output row. `bits` is 8, 4, 2 or 1 (1: the 1bit codec).

NAN_MARK = 0x7FC0


def fill_nan_row(dst, n):
    """Row n of dst = the dtype's canonical quiet NaN (what torch's masked_fill_ with nan writes)."""


@overload(fill_nan_row, jit_options=_JIT)
def _fill_nan_row_impl(dst, n):
    if dst.dtype == types.float32:
        def fill_f32(dst, n):
            v = f32_from_bits(np.uint32(0x7FC00000))
            for c in range(dst.shape[1]):
                dst[n, c] = v
        return fill_f32

    h = np.uint16(0x7E00) if dst.dtype == types.uint16 else np.int16(0x7FC0)

    def fill_16(dst, n):
        for c in range(dst.shape[1]):
            dst[n, c] = h
    return fill_16


@njit(**_INLINE)
def _put_bf16(w, pos, h):
    w[pos] = np.uint8(h & 0xFF)
    w[pos + 1] = np.uint8((h >> 8) & 0xFF)


@njit(**_INLINE)
def _get_bf16(w, pos):
    return np.uint16(np.uint16(w[pos]) | (np.uint16(w[pos + 1]) << np.uint16(8)))


@njit(**_INLINE)
def _scale_or_zero(h):
    """A received scale as float32; a NaN scale (the non-finite row mark) reads as +0.0."""
    if (h & np.uint16(0x7FFF)) > np.uint16(0x7F80):
        return F32_ZERO, True
    return bf16_to_f32(h), False


@njit(**_JIT)
def _pack_at(codes, bits, w, pos, B):
    """_pack into the bytes w[pos:pos + B] (through a slice: its indices are known non-negative,
    so numba emits no wraparound selects and the loops vectorise)."""
    d = w[pos:pos + B]
    if bits == 8:
        for j in range(B):
            d[j] = codes[j]
    elif bits == 4:
        for j in range(B):
            d[j] = codes[2 * j] | (codes[2 * j + 1] << np.uint8(4))
    elif bits == 2:
        for j in range(B):
            d[j] = (codes[4 * j] | (codes[4 * j + 1] << np.uint8(2))
                    | (codes[4 * j + 2] << np.uint8(4)) | (codes[4 * j + 3] << np.uint8(6)))
    else:
        for j in range(B):
            b = np.uint8(0)
            for i in range(8):
                b |= codes[8 * j + i] << np.uint8(i)
            d[j] = b


@njit(**_JIT)
def _unpack_at(w, pos, B, bits, codes):
    """_unpack from the bytes w[pos:pos + B]."""
    d = w[pos:pos + B]
    if bits == 8:
        for j in range(B):
            codes[j] = d[j]
    elif bits == 4:
        for j in range(B):
            b = d[j]
            codes[2 * j] = b & np.uint8(15)
            codes[2 * j + 1] = b >> np.uint8(4)
    elif bits == 2:
        for j in range(B):
            b = d[j]
            codes[4 * j] = b & np.uint8(3)
            codes[4 * j + 1] = (b >> np.uint8(2)) & np.uint8(3)
            codes[4 * j + 2] = (b >> np.uint8(4)) & np.uint8(3)
            codes[4 * j + 3] = b >> np.uint8(6)
    else:
        for j in range(B):
            b = d[j]
            for i in range(8):
                codes[8 * j + i] = (b >> np.uint8(i)) & np.uint8(1)


@njit(**_INLINE)
def _nonfinite_bits(v):
    """(bits & exponent mask) + 2**23: bit 31 set only for an exponent of all ones (inf, NaN)."""
    return (f32_bits(v) & np.uint32(0x7F800000)) + np.uint32(0x00800000)


@njit(**_INLINE)
def _residual_row(x, base, n, residual, bf, r):
    """r = row n of x (plain) or of x - base (residual; bf = the cache row as float32), in one
    pass; returns (non-finite, max |r| as bits, AND of r's bits). A row of x with a NaN or an
    infinity gives r = +0.0 (and 0, 0 for the two reductions).

    The non-finite test is an OR of _nonfinite_bits, an integer reduction; |r| as bits is ordered
    like the value, so its max is one too. The flag is tested outside the loops, so they vectorise."""
    C = r.shape[0]
    acc = np.uint32(0)
    amax = np.uint32(0)
    allbits = np.uint32(0xFFFFFFFF)
    if residual:
        for c in range(C):
            v = load_elem(x, n, c)
            b = load_elem(base, n, c)
            bf[c] = b
            d = v - b
            r[c] = d
            acc |= _nonfinite_bits(v)
            amax, allbits = _fold_abs(f32_bits(d), amax, allbits)
    else:
        for c in range(C):
            v = load_elem(x, n, c)
            r[c] = v
            acc |= _nonfinite_bits(v)
            amax, allbits = _fold_abs(f32_bits(v), amax, allbits)
    if acc & np.uint32(0x80000000):
        for c in range(C):
            r[c] = F32_ZERO
        return True, np.uint32(0), np.uint32(0)
    return False, amax, allbits


@njit(**_JIT)
def _encode_link(x, base, w, pos, bits, residual, ef, bf, r, codes):
    """One int8/int4/int2 message: row_encode's arithmetic, written at w[pos:]. Per row: one pass
    for the residual and its reductions, one that codes and (error feedback) writes the cache row,
    one that packs."""
    N, C = x.shape
    k = 8 // bits
    B = (C + k - 1) // k
    mean_step = bits == 2
    qmax = (1 << (bits - 1)) - 1
    offset = 2 if mean_step else qmax + 1
    fq = np.float32(qmax)
    lim = np.float32(qmax + 1)
    off = np.float32(offset)
    update = residual and ef
    spos = pos + N * B
    flagged = 0
    for n in range(N):
        bad, amax, allbits = _residual_row(x, base, n, residual, bf, r)
        flagged += bad
        if mean_step:
            s = bf16_round((np.float32(_abs_sum(r)) / np.float32(C)) * F32_1P25)
            sbits = bf16_bits(s)
        else:
            s, sbits = _absmax_scale(amax, allbits, qmax)
        _put_bf16(w, spos + 2 * n, np.uint16(NAN_MARK) if bad else sbits)
        if s == F32_ZERO:  # an all-zero row (or a scale that underflowed): q = 0
            for c in range(C):
                codes[c] = np.uint8(offset)
            if update:
                zero = ((off - off) + F32_HALF) * s if mean_step else (off - off) * s
                for c in range(C):
                    store_elem(base, n, c, bf[c] + zero)
        elif mean_step:
            if update:
                for c in range(C):
                    code = _q_int2(r[c], s)
                    codes[c] = code
                    store_elem(base, n, c, bf[c] + ((np.float32(code) - off) + F32_HALF) * s)
            else:
                for c in range(C):
                    codes[c] = _q_int2(r[c], s)
        elif update:
            for c in range(C):
                code = _q_absmax(r[c], s, fq, lim, off)
                codes[c] = code
                store_elem(base, n, c, bf[c] + (np.float32(code) - off) * s)
        else:
            for c in range(C):
                codes[c] = _q_absmax(r[c], s, fq, lim, off)
        _pack_at(codes, bits, w, pos + n * B, B)
        if residual and not ef and not bad:
            for c in range(C):
                base[n, c] = x[n, c]
    return flagged


@njit(**_JIT)
def _encode_link_onebit(x, base, w, pos, residual, ef, bf, r, mf, codes, colsum, tt, bad):
    """One 1bit message: onebit_encode's arithmetic (statistics over this link's rows), at w[pos:]."""
    N, C = x.shape
    B = (C + 7) // 8
    fC = np.float32(C)
    fN = np.float32(N)
    mpos = pos + N * B
    tpos = mpos + 2 * C
    update = residual and ef
    for c in range(C):
        colsum[c] = 0.0
    ttsum = 0.0
    flagged = 0
    for n in range(N):
        bad[n], _, _ = _residual_row(x, base, n, residual, bf, r)
        flagged += bad[n]
        for c in range(C):
            colsum[c] += abs(r[c])
        tt[n] = np.float32(_abs_sum(r)) / fC
        ttsum += tt[n]
    for c in range(C):
        mc = bf16_round(np.float32(colsum[c]) / fN)
        mf[c] = mc
        _put_bf16(w, mpos + 2 * c, bf16_bits(mc))
    tbar = np.float32(ttsum) / fN
    for n in range(N):
        if tbar > F32_ZERO:
            tn = bf16_round(tt[n] / tbar)
        else:
            tn = F32_ZERO
        _put_bf16(w, tpos + 2 * n, np.uint16(NAN_MARK) if bad[n] else bf16_bits(tn))
        flag = bad[n]
        if flag:  # coded as a zero residual: every sign +
            for c in range(C):
                codes[c] = np.uint8(1)
            if update:
                for c in range(C):
                    store_elem(base, n, c, load_elem(base, n, c) + mf[c] * tn)
        elif update:
            for c in range(C):
                b = load_elem(base, n, c)
                code = np.uint8(1) if load_elem(x, n, c) - b >= F32_ZERO else np.uint8(0)
                codes[c] = code
                mag = mf[c] * tn
                store_elem(base, n, c, b + (mag if code != np.uint8(0) else -mag))
        elif residual:
            for c in range(C):
                codes[c] = np.uint8(1) if load_elem(x, n, c) - load_elem(base, n, c) >= F32_ZERO else np.uint8(0)
        else:
            for c in range(C):
                codes[c] = np.uint8(1) if load_elem(x, n, c) >= F32_ZERO else np.uint8(0)
        _pack_at(codes, 1, w, pos + n * B, B)
        if residual and not ef and not flag:
            for c in range(C):
                base[n, c] = x[n, c]
    return flagged


@njit(**_JIT)
def encode_block(x3, base3, wire, offset, skip, bits, residual, ef):
    """For each link l != skip: code x3[l] (plain) or x3[l] - base3[l] (residual; base3[l] updated
    as row_encode / onebit_encode do) into wire[l, offset:offset + P].

    x3, base3: (L, N, C) float32, float16 or bfloat16 bits; wire (L, nbytes) uint8; bits 8/4/2/1.
    Returns the number of rows marked non-finite."""
    L, N, C = x3.shape
    xf = np.empty(C, np.float32)
    bf = np.empty(C, np.float32)
    r = np.empty(C, np.float32)
    k = 8 // bits
    codes = np.zeros(((C + k - 1) // k) * k, np.uint8)
    colsum = np.empty(C if bits == 1 else 0, np.float64)  # 1bit's statistics
    tt = np.empty(N if bits == 1 else 0, np.float32)
    bad = np.empty(N if bits == 1 else 0, np.bool_)
    flagged = 0
    for l in range(L):
        if l == skip:
            continue
        if bits == 1:
            flagged += _encode_link_onebit(x3[l], base3[l], wire[l], offset, residual, ef,
                                           bf, r, xf, codes, colsum, tt, bad)
        else:
            flagged += _encode_link(x3[l], base3[l], wire[l], offset, bits, residual, ef, bf, r, codes)
    return flagged


@njit(**_JIT)
def _decode_link(w, pos, base, out, bits, residual, codes, v, mf):
    """One message of w[pos:] decoded: as row_decode / onebit_decode, the cache into base (residual)
    and the result into out; a row with a NaN scale (1bit: t) decodes with scale +0.0 and its out
    row is NaN."""
    N, C = out.shape
    k = 8 // bits
    B = (C + k - 1) // k
    cview = codes[:C]
    spos = pos + N * B
    mean_step = bits == 2
    offset = 2 if mean_step else (1 << (bits - 1))
    if bits == 1:  # m (C,) precedes t (N,)
        for c in range(C):
            mf[c] = bf16_to_f32(_get_bf16(w, spos + 2 * c))
        spos += 2 * C
    for n in range(N):
        _unpack_at(w, pos + n * B, B, bits, codes)
        s, marked = _scale_or_zero(_get_bf16(w, spos + 2 * n))
        if bits == 1:
            _deq_onebit(cview, mf, s, v)
        else:
            _deq_row(cview, s, offset, mean_step, v)
        if residual:
            if marked:
                for c in range(C):
                    store_elem(base, n, c, load_elem(base, n, c) + v[c])
                fill_nan_row(out, n)
            else:  # the cache row, then out = its stored value
                for c in range(C):
                    store_elem(base, n, c, load_elem(base, n, c) + v[c])
                    out[n, c] = base[n, c]
        elif marked:
            fill_nan_row(out, n)
        else:
            store_row(out, n, v)


@njit(**_JIT)
def decode_block(wire, offset, base3, out3, src3, has_src, skip, bits, residual):
    """For each link l != skip: decode wire[l, offset:] into out3[l] (plain: deq cast to the dtype;
    residual: base3[l] <- base3[l] + deq, and out3[l] <- that). With has_src, out3[skip] <- src3[skip]."""
    L, N, C = out3.shape
    k = 8 // bits
    codes = np.empty(((C + k - 1) // k) * k, np.uint8)
    v = np.empty(C, np.float32)
    mf = np.empty(C, np.float32)
    for l in range(L):
        if l == skip:
            if has_src:
                o = out3[l]
                s = src3[l]
                for n in range(N):
                    for c in range(C):
                        o[n, c] = s[n, c]
            continue
        _decode_link(wire[l], offset, base3[l], out3[l], bits, residual, codes, v, mf)


# Entry points on raw addresses: the tensor wrappers pass data_ptr()s and sizes (plain ints), which
# costs far less per call than numpy views of the tensors. The wrappers have checked every shape,
# dtype, contiguity and bound; kind 0 reads float32, 1 float16 (uint16), 2 bfloat16 (int16).

def _ptr_intrinsic(dtype):
    @intrinsic
    def as_ptr(typingctx, addr):
        if not isinstance(addr, types.Integer):
            return None
        ptr_type = types.CPointer(dtype)

        def codegen(context, builder, signature, args):
            return builder.inttoptr(args[0], context.get_value_type(ptr_type))

        return ptr_type(addr), codegen
    return as_ptr


_f32_ptr = _ptr_intrinsic(types.float32)
_u16_ptr = _ptr_intrinsic(types.uint16)
_i16_ptr = _ptr_intrinsic(types.int16)
_u8_ptr = _ptr_intrinsic(types.uint8)


@njit(**_JIT)
def encode_block_ptr(px, pb, pw, L, N, C, nbytes, offset, skip, kind, bits, residual, ef):
    """encode_block on the arrays at these addresses (x, base: (L, N, C); wire: (L, nbytes))."""
    wire = carray(_u8_ptr(pw), (L, nbytes))
    if kind == 0:
        return encode_block(carray(_f32_ptr(px), (L, N, C)), carray(_f32_ptr(pb), (L, N, C)), wire,
                            offset, skip, bits, residual, ef)
    if kind == 1:
        return encode_block(carray(_u16_ptr(px), (L, N, C)), carray(_u16_ptr(pb), (L, N, C)), wire,
                            offset, skip, bits, residual, ef)
    return encode_block(carray(_i16_ptr(px), (L, N, C)), carray(_i16_ptr(pb), (L, N, C)), wire,
                        offset, skip, bits, residual, ef)


@njit(**_JIT)
def decode_block_ptr(pw, pb, po, ps, L, N, C, nbytes, offset, skip, kind, bits, residual, has_src):
    """decode_block on the arrays at these addresses (wire: (L, nbytes); base, out, src: (L, N, C))."""
    wire = carray(_u8_ptr(pw), (L, nbytes))
    if kind == 0:
        decode_block(wire, offset, carray(_f32_ptr(pb), (L, N, C)), carray(_f32_ptr(po), (L, N, C)),
                     carray(_f32_ptr(ps), (L, N, C)), has_src, skip, bits, residual)
    elif kind == 1:
        decode_block(wire, offset, carray(_u16_ptr(pb), (L, N, C)), carray(_u16_ptr(po), (L, N, C)),
                     carray(_u16_ptr(ps), (L, N, C)), has_src, skip, bits, residual)
    else:
        decode_block(wire, offset, carray(_i16_ptr(pb), (L, N, C)), carray(_i16_ptr(po), (L, N, C)),
                     carray(_i16_ptr(ps), (L, N, C)), has_src, skip, bits, residual)
