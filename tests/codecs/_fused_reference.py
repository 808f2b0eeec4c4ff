"""Plain-torch transcription of docs/codec_format.md, the oracle for tests/codecs/test_fused_kernels.py.

Kept independent of compactfusion_xdit.codecs so the kernels are checked against the document
itself; the tests also compare with the codecs package's torch path when it is importable.
"""
import torch

QMAX = {"int8": 127, "int4": 7}
BITS = {"int8": 8, "int4": 4, "int2": 2, "1bit": 1}


def _bf16(v):
    return v.to(torch.bfloat16).float()


def _div(a, b):
    """IEEE a / b for a Python number b. (On CUDA, torch turns `tensor / python_scalar` into
    tensor * (1 / scalar), which differs in the last bit; a tensor divisor keeps true division.)"""
    return a / torch.full_like(a, b)


def pack(codes, bits):
    N, C = codes.shape
    k = 8 // bits
    B = -(-C // k)
    padded = torch.zeros((N, B * k), dtype=torch.int32, device=codes.device)
    padded[:, :C] = codes.to(torch.int32)
    shifts = torch.arange(k, device=codes.device, dtype=torch.int32) * bits
    return (padded.view(N, B, k) << shifts).sum(-1).to(torch.uint8)


def unpack(data, bits, C):
    N, B = data.shape
    k = 8 // bits
    shifts = torch.arange(k, device=data.device, dtype=torch.int32) * bits
    codes = (data.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.view(N, B * k)[:, :C]


def encode(name, r):
    """r: float32 (N, C). Returns the payload tensors."""
    N, C = r.shape
    if name in QMAX:
        qmax = QMAX[name]
        s = _bf16(_div(r.abs().amax(dim=1), qmax))
        safe = torch.where(s > 0, s, torch.ones_like(s))
        q = torch.clamp(torch.round(r / safe[:, None]), -qmax, qmax)
        q = torch.where(s[:, None] > 0, q, torch.zeros_like(q))
        return pack(q.to(torch.int32) + qmax + 1, BITS[name]), s.to(torch.bfloat16)
    if name == "int2":
        d = _bf16(_div(r.abs().sum(dim=1), C) * 1.25)
        safe = torch.where(d > 0, d, torch.ones_like(d))
        q = torch.clamp(torch.floor(r / safe[:, None]), -2, 1)
        q = torch.where(d[:, None] > 0, q, torch.zeros_like(q))
        return pack(q.to(torch.int32) + 2, 2), d.to(torch.bfloat16)
    if name == "1bit":
        a = r.abs()
        m = _bf16(_div(a.sum(dim=0), N))
        tt = _div(a.sum(dim=1), C)
        tbar = _div(tt.sum(), N)
        t = _bf16(tt / tbar) if tbar > 0 else torch.zeros_like(tt)
        return pack((r >= 0).to(torch.int32), 1), m.to(torch.bfloat16), t.to(torch.bfloat16)
    raise ValueError(name)


def deq(name, tensors, C):
    if name in QMAX:
        data, s = tensors
        q = unpack(data, BITS[name], C) - (QMAX[name] + 1)
        return q.float() * s.float()[:, None]
    if name == "int2":
        data, d = tensors
        q = unpack(data, 2, C) - 2
        return (q.float() + 0.5) * d.float()[:, None]
    data, m, t = tensors
    mag = m.float()[None, :] * t.float()[:, None]
    return torch.where(unpack(data, 1, C) != 0, mag, -mag)


def to_dtype(v, dtype):
    """Saturating cast, as the codecs package's `to_dtype` (no overflow to inf)."""
    if dtype != torch.float32:
        big = torch.finfo(dtype).max
        v = v.clamp(-big, big)
    return v.to(dtype)


def encode_residual(name, x, base, error_feedback=True):
    tensors = encode(name, x.float() - base.float())
    if error_feedback:
        base.copy_(to_dtype(base.float() + deq(name, tensors, x.shape[1]), base.dtype))
    else:
        base.copy_(x)
    return tensors


def decode_residual(name, tensors, base):
    base.copy_(to_dtype(base.float() + deq(name, tensors, base.shape[1]), base.dtype))
