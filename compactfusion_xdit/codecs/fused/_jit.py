"""Small Triton device helpers shared by the fused codec kernels.

Each helper reproduces one step of docs/codec_format.md exactly, and uses only operations that
Triton's interpreter (TRITON_INTERPRET=1) evaluates the same way as the GPU, so the CPU tests
check the very arithmetic the GPU runs.
"""
import os

import triton
import triton.language as tl

# 1.5 * 2**23: adding then subtracting it rounds a float32 of magnitude < 2**22 to an integer
# with the hardware's round-half-to-even (no libdevice call, which the interpreter lacks).
_RINT_MAGIC = tl.constexpr(12582912.0)


@triton.jit
def rint(v):
    """Round half to even; exact for |v| < 2**22 (callers clamp first)."""
    return (v + _RINT_MAGIC) - _RINT_MAGIC


@triton.jit
def bf16_round(v):
    """float32 -> nearest-even bfloat16 value, returned as float32 (finite inputs)."""
    u = v.to(tl.uint32, bitcast=True)
    u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    return u.to(tl.float32, bitcast=True)


@triton.jit
def store_as(ptr, v, mask, OUT_KIND: tl.constexpr):
    """Store float32 `v` in the output dtype (0 fp32, 1 fp16, 2 bf16): saturated at the dtype's
    largest finite value, then rounded to nearest-even (the codecs' `to_dtype`)."""
    if OUT_KIND == 0:
        tl.store(ptr, v, mask=mask)
    elif OUT_KIND == 1:
        v = tl.minimum(tl.maximum(v, -65504.0), 65504.0)
        tl.store(ptr, v.to(tl.float16), mask=mask)
    else:
        v = tl.minimum(tl.maximum(v, -3.3895313892515355e38), 3.3895313892515355e38)
        tl.store(ptr, bf16_round(v).to(tl.bfloat16), mask=mask)


@triton.jit
def load_f32(ptr, mask):
    return tl.load(ptr, mask=mask, other=0.0).to(tl.float32)


def exact_fma_available() -> bool:
    """tl.fma rounds once: always on the GPU; under TRITON_INTERPRET only where the interpreter
    has a native fused multiply-add (older interpreters multiply and add, rounding twice)."""
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        return True
    from triton.runtime import interpreter
    return hasattr(getattr(interpreter, "_interpreter", None), "fma_fp32")


@triton.jit
def div_rn_by_scale(r, s, FAST: tl.constexpr):
    """IEEE-correct r / s for a scale s > 0 shared by all elements of r.

    div.rn per element costs more than the memory traffic of the whole kernel, so with FAST the
    quotient comes from the correctly rounded reciprocal y = RN(1/s) and two Newton-Markstein
    corrections q <- RN(q + RN(r - q*s)*y) (remainder exact through the FMA): the first makes q
    faithful, the second then rounds it correctly (Markstein's theorem). That needs no underflow
    or overflow: for scales outside [2**-90, 2**90] the per-element division is used instead.
    """
    if FAST:
        if (s >= 8.077935669463161e-28) & (s <= 1.2379400392853803e+27):
            y = tl.math.div_rn(1.0, s)
            q = r * y
            q = tl.fma(tl.fma(-q, s, r), y, q)
            v = tl.fma(tl.fma(-q, s, r), y, q)
            v = tl.where(r == 0.0, r, v)  # the FMAs turn -0 / s into +0
        else:
            v = tl.math.div_rn(r, s)
    else:
        v = tl.math.div_rn(r, s)
    return v
