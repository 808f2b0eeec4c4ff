"""The block kernels (codecs.cpu.encode_block / decode_block) == the 2-D compiled kernels, per link.

A block codes L links' messages into a (L, nbytes) uint8 wire at a byte offset, in one call.
Oracle: the compiled 2-D path (cpu.encode_tensors / decode_tensors, itself tested against the
torch reference in test_cpu_codecs.py) applied to each link alone. Properties:
- wire bytes of every coded link equal the 2-D payload's bytes (data, then the scales' bf16
  bytes), at even and odd offsets; bytes outside the messages and the skipped row untouched;
- caches after encode and decode bitwise equal to the 2-D path's; decode outputs too;
- rows of x with NaN/inf: marked by the bf16 NaN 0x7FC0 in the scale (1bit: t), coded otherwise
  as a zero residual; both ends' caches stay equal and finite; the out rows are the dtype's NaN.
Also the per-process path decision of `_loader` (no switch mid-run) and argument checks.
"""
import importlib.util
import threading

import pytest
import torch

from compactfusion_xdit import codecs
from compactfusion_xdit.codecs import cpu
from compactfusion_xdit.codecs.cpu import _loader

CODECS = ["int8", "int4", "int2", "1bit"]
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
SHAPES = [(1, 1), (7, 9), (64, 64), (5, 130)]
MODES = [("plain", False, True), ("residual", True, True), ("residual-no-ef", True, False)]
HAS_NUMBA = importlib.util.find_spec("numba") is not None
SENTINEL = 0xA5
NAN_BITS = {torch.float32: 0x7FC00000, torch.bfloat16: 0x7FC0, torch.float16: 0x7E00}
#: Like test_cpu_codecs.py: these need the compiled kernels (a cold numba cache compiles for about
#: a minute), so CI leaves them to ``-m slow``.
SLOW = pytest.mark.slow
needs_numba = pytest.mark.skipif(not HAS_NUMBA, reason="numba is not installed (pip install numba)")


pytestmark = pytest.mark.usefixtures("cpu_kernels_env")


def _bits(t):
    """The raw bits of a float tensor as integers (so NaNs compare by bits)."""
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


def _inputs(L, N, C, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(L, N, C, generator=gen).to(dtype)
    base = (x.float() + 0.3 * torch.randn(L, N, C, generator=gen)).to(dtype)
    if N > 1:  # a zero row and an exactly cached row: zero scales
        x[:, 0].zero_()
        base[:, N - 1] = x[:, N - 1]
    return x, base


def _message(tensors):
    """The 2-D payload as wire bytes: data, then each scale tensor's little-endian bf16 bytes."""
    return torch.cat([t.contiguous().view(torch.uint8).reshape(-1) for t in tensors])


def _wire(L, nbytes):
    return torch.full((L, nbytes), SENTINEL, dtype=torch.uint8)


@SLOW
@needs_numba
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", CODECS)
def test_block_equals_the_2d_kernels_per_link(compiled, name, dtype):
    codec = codecs.get(name)
    seed = 0
    for N, C in SHAPES:
        P = codec.payload_nbytes((N, C), dtype)
        for L, skip in ((1, -1), (3, -1), (3, 1)):
            for offset in (0, 3):
                for mode, residual, ef in MODES:
                    seed += 1
                    tag = f"{name} {dtype} L={L} skip={skip} {N}x{C} offset={offset} {mode}"
                    x, base0 = _inputs(L, N, C, dtype, seed)
                    nbytes = offset + P + 5
                    wire = _wire(L, nbytes)
                    b_blk = base0.clone()
                    cpu.encode_block(name, x, b_blk if residual else None, wire, offset, skip, residual, ef)
                    b_ref = base0.clone()
                    for l in range(L):
                        if l == skip:
                            assert (wire[l] == SENTINEL).all(), f"{tag}: skipped row written"
                            continue
                        tensors = cpu.encode_tensors(name, x[l], b_ref[l] if residual else None, ef)
                        assert torch.equal(wire[l, offset:offset + P], _message(tensors)), f"{tag}: link {l} bytes"
                        assert (wire[l, :offset] == SENTINEL).all() and (wire[l, offset + P:] == SENTINEL).all(), \
                            f"{tag}: bytes outside link {l}'s message"
                    assert torch.equal(_bits(b_blk), _bits(b_ref)), f"{tag}: sender caches"
                    # decode: the receiver's cache starts where the sender's did
                    out = torch.full_like(x, 7.0)
                    r_blk = base0.clone()
                    cpu.decode_block(name, wire, offset, r_blk if residual else None, out, skip, residual,
                                     src3=x if L > 1 else None)
                    r_ref = base0.clone()
                    for l in range(L):
                        if l == skip:
                            assert torch.equal(_bits(out[l]), _bits(x[l])), f"{tag}: own chunk not copied"
                            continue
                        tensors = codec.unflatten(wire[l, offset:offset + P].clone(), (N, C), dtype).tensors
                        if residual:
                            cpu.decode_tensors(name, tensors, (N, C), dtype, base=r_ref[l])
                            assert torch.equal(_bits(out[l]), _bits(r_ref[l])), f"{tag}: out link {l}"
                        else:
                            y = cpu.decode_tensors(name, tensors, (N, C), dtype)
                            assert torch.equal(_bits(out[l]), _bits(y)), f"{tag}: plain out link {l}"
                    assert torch.equal(_bits(r_blk), _bits(r_ref)), f"{tag}: receiver caches"
                    if residual and ef:
                        assert torch.equal(_bits(r_blk), _bits(b_blk)), f"{tag}: sender != receiver cache"


@SLOW
@needs_numba
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", CODECS)
def test_non_finite_rows_are_marked_and_both_caches_stay_finite(compiled, name, dtype):
    codec = codecs.get(name)
    L, N, C, offset = 3, 6, 37, 3
    P = codec.payload_nbytes((N, C), dtype)
    B = -(-C * {"int8": 8, "int4": 4, "int2": 2, "1bit": 1}[name] // 8)
    first_scale = N * B + (2 * C if name == "1bit" else 0)  # s (int*) or t (1bit) bytes start here
    for skip in (-1, 1):
        for mode, residual, ef in MODES:
            tag = f"{name} {dtype} skip={skip} {mode}"
            x, base0 = _inputs(L, N, C, dtype, seed=11)
            bad = torch.zeros(L, N, dtype=torch.bool)
            for l, n, c, v in ((0, 1, 3, float("nan")), (0, 4, 0, float("inf")), (2, 2, 36, -float("inf")),
                               (2, 5, 0, float("nan")), (2, 5, 9, float("inf")), (1, 3, 5, float("nan"))):
                x[l, n, c] = v
                bad[l, n] = True
            wire = _wire(L, offset + P + 2)
            b_blk = base0.clone()
            cpu.encode_block(name, x, b_blk if residual else None, wire, offset, skip, residual, ef)
            # the oracle: the 2-D kernel on x with the marked rows replaced by the cache (residual:
            # a zero residual) or by zeros (plain)
            x_sub = torch.where(bad[..., None], base0 if residual else torch.zeros_like(x), x)
            b_ref = base0.clone()
            for l in range(L):
                if l == skip:
                    assert (wire[l] == SENTINEL).all(), tag
                    continue
                msg = wire[l, offset:offset + P]
                marks = msg[first_scale:first_scale + 2 * N].reshape(N, 2)
                is_mark = (marks[:, 0] == 0xC0) & (marks[:, 1] == 0x7F)
                assert torch.equal(is_mark, bad[l]), f"{tag}: link {l} marks {is_mark.tolist()}"
                exp = _message(cpu.encode_tensors(name, x_sub[l], b_ref[l] if residual else None, ef))
                keep = torch.ones(P, dtype=torch.bool)
                for n in bad[l].nonzero().flatten().tolist():
                    keep[first_scale + 2 * n:first_scale + 2 * n + 2] = False
                assert torch.equal(msg[keep], exp[keep]), f"{tag}: link {l} bytes besides the marks"
            assert torch.equal(_bits(b_blk), _bits(b_ref)), f"{tag}: sender cache"
            out = torch.zeros_like(x)
            r_blk = base0.clone()
            cpu.decode_block(name, wire, offset, r_blk if residual else None, out, skip, residual)
            links = [l for l in range(L) if l != skip]
            canon = torch.full((C,), NAN_BITS[dtype], dtype=torch.int64)
            torch_nan = torch.zeros(C, dtype=dtype).masked_fill_(torch.ones(C, dtype=torch.bool), float("nan"))
            assert torch.equal(_bits(torch_nan).to(torch.int64) & 0xFFFFFFFF, canon & 0xFFFFFFFF)
            if residual:
                if ef:  # without error feedback the sender keeps x, the receiver base + deq
                    assert torch.equal(_bits(r_blk), _bits(b_blk)), f"{tag}: sender != receiver cache"
                assert torch.isfinite(b_blk).all() and torch.isfinite(r_blk).all(), tag
            for l in links:
                for n in range(N):
                    row = _bits(out[l, n]).to(torch.int64) & (0xFFFFFFFF if dtype == torch.float32 else 0xFFFF)
                    if bad[l, n]:
                        assert torch.equal(row, canon), f"{tag}: out[{l}, {n}] is not the canonical NaN"
                    elif residual:
                        assert torch.equal(_bits(out[l, n]), _bits(r_blk[l, n])), f"{tag}: out[{l}, {n}]"
                    else:
                        assert torch.isfinite(out[l, n]).all(), f"{tag}: out[{l}, {n}]"
            if not residual:  # unmarked rows: the plain 2-D decode of the substituted input
                for l in links:
                    y = cpu.decode_tensors(name, cpu.encode_tensors(name, x_sub[l]), (N, C), dtype)
                    fine = ~bad[l]
                    assert torch.equal(_bits(out[l][fine]), _bits(y[fine])), f"{tag}: plain out link {l}"
            if skip >= 0:
                assert (out[skip] == 0).all() and torch.equal(_bits(r_blk[skip]), _bits(base0[skip])), tag


@SLOW
@needs_numba
def test_bad_arguments_raise_value_errors(compiled):
    x = torch.zeros(2, 4, 8)
    base = torch.zeros(2, 4, 8)
    P = codecs.get("int4").payload_nbytes((4, 8), torch.float32)
    wire = torch.zeros(2, P + 1, dtype=torch.uint8)
    cpu.encode_block("int4", x, base, wire, 1, 0, True)  # fits exactly
    assert cpu.block_nbytes("int4", 4, 8) == P
    cases = [
        (("lowrank-4", x, base, wire, 0, -1, True), "lowrank-4"),
        (("int4", x, base, wire, 2, -1, True), "does not fit"),
        (("int4", x, base, wire, -1, -1, True), "does not fit"),
        (("int4", x, base, wire, 0, 2, True), "skip"),
        (("int4", x, base, wire, 0, -2, True), "skip"),
        (("int4", x, None, wire, 0, -1, True), "base3"),
        (("int4", x, base.double(), wire, 0, -1, True), "base3"),
        (("int4", x, base[:, :, :4], wire, 0, -1, True), "base3"),
        (("int4", x[:, :, ::2], base, wire, 0, -1, True), "contiguous"),
        (("int4", x[0], base[0], wire, 0, -1, True), "3-D"),
        (("int4", x.int(), base, wire, 0, -1, True), "float"),
        (("int4", x, base, wire[:1], 0, -1, True), "rows"),
        (("int4", x, base, wire.char(), 0, -1, True), "uint8"),
    ]
    for args, match in cases:
        with pytest.raises(ValueError, match=match):
            cpu.encode_block(*args)
    out = torch.zeros_like(x)
    with pytest.raises(ValueError, match="src3"):
        cpu.decode_block("int4", wire, 0, base, out, 0, True, src3=x.half())
    with pytest.raises(ValueError, match="base3"):
        cpu.decode_block("int4", wire, 0, None, out, 0, True)
    with pytest.raises(ValueError, match="does not fit"):
        cpu.decode_block("1bit", wire, 0, None, out, 0, False)


@SLOW
@needs_numba
def test_the_block_path_is_one_call_for_many_links(compiled):
    """L = 8 links of 1bit: statistics per link (a link scaled by 1000 leaves the others' m alone)."""
    x, base = _inputs(8, 16, 24, torch.float32, seed=3)
    x[5] *= 1000
    P = codecs.get("1bit").payload_nbytes((16, 24), torch.float32)
    wire = torch.zeros(8, P, dtype=torch.uint8)
    cpu.encode_block("1bit", x, None, wire, 0, -1, False)
    for l in range(8):
        assert torch.equal(wire[l], _message(cpu.encode_tensors("1bit", x[l]))), l


# ---- the per-process path decision -------------------------------------------------------------

@SLOW
@needs_numba
def test_a_cached_compile_is_used_from_the_first_call(fresh_loader, compiled, monkeypatch):
    x = torch.zeros(4, 8)
    assert cpu.supports("int4", x)  # the marker exists (the fixture compiled): loaded at once
    assert cpu.status() == "ready"


@needs_numba
def test_without_a_compile_the_process_stays_on_torch(fresh_loader, monkeypatch, tmp_path):
    """No marker: the first call starts the compile and returns; the process keeps the torch path
    after the compile has finished (no switch mid-run) until ensure_compiled() adopts the kernels."""
    monkeypatch.setattr(_loader, "_marker", lambda: str(tmp_path / "absent" / "marker.ok"))
    started, release = threading.Event(), threading.Event()

    def fake_compile():
        started.set()
        release.wait(30)

    monkeypatch.setattr(_loader, "_compile_in_subprocess", fake_compile)
    monkeypatch.setattr(_loader, "_load", lambda: "kernels")  # a stand-in: only the decision is tested
    x = torch.zeros(4, 8)
    assert not cpu.supports("int4", x)
    assert started.wait(10) and cpu.status() == "compiling"
    release.set()
    assert _loader._done.wait(10)
    assert not cpu.supports("int4", x)
    assert cpu.status().startswith("torch for this process")
    assert cpu.ensure_compiled(timeout=10)
    assert cpu.supports("int4", x) and cpu.status() == "ready"


def test_cfx_cpu_kernels_0_turns_the_compiled_path_off(monkeypatch):
    x = torch.zeros(4, 8)
    monkeypatch.setenv("CFX_CPU_KERNELS", "0")
    monkeypatch.setattr(_loader, "kernels", lambda *a, **k: pytest.fail("the loader was consulted"))
    assert not cpu.enabled() and not cpu.supports("int4", x)
    monkeypatch.setenv("CFX_CPU_KERNELS", "1")
    assert cpu.enabled()
    monkeypatch.delenv("CFX_CPU_KERNELS")
    assert cpu.enabled()
