"""The compiled CPU codecs (compactfusion_xdit/codecs/cpu, numba) == the torch arithmetic.

Oracle: tests/_fused_reference.py (a plain-torch transcription of docs/codec_format.md) and the
codecs package's own torch path (CFX_FORCE_TORCH=1). Properties, per codec, dtype and shape:
- int8/int4: payload bytes and scales bitwise equal to the reference;
- int2/1bit (sums): each scale equal or one bf16 ulp away, in at most max(1, 0.1 %) of them;
  codes equal in rows whose scale is equal; 1bit sign bits equal everywhere;
- every decode (of the compiled payload and of the reference payload) and every cache update
  bitwise equal to the reference, so compiled and torch ends stay in sync.
The module-scoped fixture compiles the kernels (numba's cache makes later runs fast).
"""
import importlib.util
import os

import pytest
import torch

from compactfusion_xdit import codecs
from compactfusion_xdit.codecs import base as codec_base
from compactfusion_xdit.codecs import cpu
from compactfusion_xdit.codecs.cpu import _loader

HERE = os.path.dirname(os.path.abspath(__file__))
CODECS = ["int8", "int4", "int2", "1bit"]
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
SHAPES = [(1, 1), (7, 9), (3, 37), (64, 64), (33, 4100), (257, 3073)]
HAS_NUMBA = importlib.util.find_spec("numba") is not None


def _reference():
    spec = importlib.util.spec_from_file_location("_fused_reference", os.path.join(HERE, "_fused_reference.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


ref = _reference()
#: Tests that need the compiled kernels: a cold numba cache compiles them for
#: about a minute, so CI leaves them to ``-m slow``.
SLOW = pytest.mark.slow
needs_numba = pytest.mark.skipif(not HAS_NUMBA, reason="numba is not installed (pip install numba)")


pytestmark = pytest.mark.usefixtures("cpu_kernels_env")


def _inputs(N, C, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, generator=gen).to(dtype)
    base = (x.float() + 0.3 * torch.randn(N, C, generator=gen)).to(dtype)
    if N * C > 1:  # an all-zero row and an exactly cached row: zero scales
        x[0].zero_()
        base[N - 1] = x[N - 1]
    if N > 1 and dtype == torch.float16:  # the top of fp16: the cache update saturates
        x[1] = 65504.0
        base[1] = -65504.0
    return x, base


def _ulps(a, b):
    return (a.view(torch.int16).to(torch.int32) - b.view(torch.int16).to(torch.int32)).abs()


def _assert_payload(name, got, exp, C, tag):
    if name in ("int8", "int4"):
        for i, (g, e) in enumerate(zip(got, exp)):
            assert g.shape == e.shape and g.dtype == e.dtype, f"{tag}: tensor {i} layout"
            assert torch.equal(g.view(torch.uint8), e.view(torch.uint8)), f"{tag}: payload tensor {i} differs"
        return
    scales = got[1:]
    for g, e in zip(scales, exp[1:]):
        ulps = _ulps(g, e)
        ndiff = int((ulps != 0).sum())
        assert int(ulps.max()) <= 1 and ndiff <= max(1, e.numel() // 1000), f"{tag}: {ndiff} scales differ"
    if name == "int2":
        qg, qe = ref.unpack(got[0], 2, C), ref.unpack(exp[0], 2, C)
        same = got[1] == exp[1]
        assert torch.equal(qg[same], qe[same]), f"{tag}: codes differ in rows with equal step"
        assert int((qg - qe).abs().max()) <= 1, f"{tag}: codes differ by more than 1"
    else:
        assert torch.equal(got[0], exp[0]), f"{tag}: sign bits differ"


@SLOW
@needs_numba
@pytest.mark.parametrize("name", CODECS)
def test_kernels_match_the_reference(compiled, name):
    for dtype in DTYPES:
        for N, C in SHAPES:
            tag = f"{name} {dtype} {N}x{C}"
            x, base0 = _inputs(N, C, dtype)
            got = cpu.encode_tensors(name, x)
            exp = ref.encode(name, x.float())
            _assert_payload(name, got, exp, C, tag + " plain")
            for which, payload in (("cpu", got), ("ref", exp)):
                y = cpu.decode_tensors(name, payload, (N, C), dtype)
                assert torch.equal(y, ref.to_dtype(ref.deq(name, payload, C), dtype)), f"{tag} plain decode of {which}"
            for ef in (True, False):
                b_cpu, b_ref = base0.clone(), base0.clone()
                got = cpu.encode_tensors(name, x, b_cpu, ef)
                exp = ref.encode_residual(name, x, b_ref, ef)
                _assert_payload(name, got, exp, C, f"{tag} residual ef={ef}")
                if not ef:
                    assert torch.equal(b_cpu, x)
                    continue
                receiver = base0.clone()
                ref.decode_residual(name, got, receiver)
                assert torch.equal(b_cpu, receiver), f"{tag}: cpu sender cache != reference receiver cache"
                for which, payload in (("cpu", got), ("ref", exp)):
                    b_dec, b_dec_ref = base0.clone(), base0.clone()
                    cpu.decode_tensors(name, payload, (N, C), dtype, base=b_dec)
                    ref.decode_residual(name, payload, b_dec_ref)
                    assert torch.equal(b_dec, b_dec_ref), f"{tag}: residual decode of {which} payload"


@SLOW
@needs_numba
@pytest.mark.parametrize("name", CODECS)
def test_codecs_dispatch_to_the_cpu_path_and_agree_with_the_torch_path(compiled, name, monkeypatch):
    codec = codecs.get(name)
    x, base0 = _inputs(37, 4100, torch.bfloat16, seed=3)
    assert codec_base._fused_backend(name, x) is cpu
    b_cpu = base0.clone()
    p_cpu = codec.encode_residual(x, b_cpu)
    y_cpu = codec.decode(p_cpu)
    monkeypatch.setenv("CFX_FORCE_TORCH", "1")
    assert codec_base._fused_backend(name, x) is None
    b_torch = base0.clone()
    p_torch = codec.encode_residual(x, b_torch)
    receiver = base0.clone()
    codec.decode_residual(p_cpu, receiver)
    _assert_payload(name, p_cpu.tensors, p_torch.tensors, 4100, name)
    assert p_cpu.nbytes == p_torch.nbytes == codec.payload_nbytes((37, 4100), torch.bfloat16)
    assert torch.equal(p_cpu.flatten(), p_torch.flatten()) or name in ("int2", "1bit")
    assert torch.equal(b_cpu, receiver)
    assert torch.equal(y_cpu, codec.decode(p_cpu))
    rebuilt = codec.unflatten(p_cpu.flatten(), (37, 4100), torch.bfloat16)
    monkeypatch.delenv("CFX_FORCE_TORCH")
    assert torch.equal(codec.decode(rebuilt), y_cpu)


@SLOW
@needs_numba
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", CODECS)
def test_cpu_and_torch_ends_stay_in_sync(compiled, name, dtype, monkeypatch):
    """Eight steps of a drifting signal, odd N and C: a compiled sender with a torch receiver, and
    a torch sender with a compiled receiver, keep bitwise-equal caches."""
    codec = codecs.get(name)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(77, 301, generator=gen)
    ends = {k: torch.zeros(77, 301, dtype=dtype) for k in ("cpu_tx", "torch_rx", "torch_tx", "cpu_rx")}
    for _ in range(8):
        x = x + 0.2 * torch.randn(x.shape, generator=gen)
        xd = x.to(dtype)
        p1 = codec.encode_residual(xd, ends["cpu_tx"])
        monkeypatch.setenv("CFX_FORCE_TORCH", "1")
        codec.decode_residual(p1, ends["torch_rx"])
        p2 = codec.encode_residual(xd, ends["torch_tx"])
        monkeypatch.delenv("CFX_FORCE_TORCH")
        codec.decode_residual(p2, ends["cpu_rx"])
        assert torch.equal(ends["cpu_tx"], ends["torch_rx"])
        assert torch.equal(ends["torch_tx"], ends["cpu_rx"])


@SLOW
@needs_numba
@pytest.mark.parametrize("name", CODECS)
def test_nan_and_inf_are_handled_as_the_torch_path_does(compiled, name, monkeypatch):
    """Non-finite inputs (the channels send those raw; the format leaves them unspecified): codes
    equal the torch path's, scales and caches NaN where its are and bitwise equal elsewhere."""
    codec = codecs.get(name)
    x = torch.randn(12, 40)
    x[2, 5] = float("nan")
    x[4, 0] = float("inf")
    x[6, 7] = -float("inf")
    for dtype in DTYPES:
        xd = x.to(dtype)
        b_cpu = torch.zeros(12, 40, dtype=dtype)
        p_cpu = codec.encode_residual(xd, b_cpu)
        monkeypatch.setenv("CFX_FORCE_TORCH", "1")
        b_torch = torch.zeros(12, 40, dtype=dtype)
        p_torch = codec.encode_residual(xd, b_torch)
        monkeypatch.delenv("CFX_FORCE_TORCH")
        assert torch.equal(p_cpu.tensors[0], p_torch.tensors[0]), f"{name} {dtype}: codes"
        for g, e in zip(p_cpu.tensors[1:], p_torch.tensors[1:]):
            assert torch.equal(g.isnan(), e.isnan())
            fin = ~e.isnan()
            assert torch.equal(g[fin].view(torch.int16), e[fin].view(torch.int16)), f"{name} {dtype}: scales"
        assert torch.equal(b_cpu.isnan(), b_torch.isnan())
        fin = ~b_torch.isnan()
        assert torch.equal(b_cpu[fin], b_torch[fin]), f"{name} {dtype}: caches"


@SLOW
@needs_numba
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_conversions_match_torch_bit_for_bit(compiled, dtype):
    """Caches holding every kind of 16-bit value (random bit patterns: subnormals, the largest
    finite values, both zeros) and deq values over many exponents: the compiled loads, adds and
    saturating round-to-nearest-even stores give torch's bits."""
    gen = torch.Generator().manual_seed(5)
    cache = torch.randint(-2**15, 2**15, (64, 257), generator=gen, dtype=torch.int32).to(torch.int16).view(dtype)
    cache[~torch.isfinite(cache)] = 0
    cache[0, :4] = torch.tensor([0.0, -0.0, torch.finfo(dtype).max, -torch.finfo(dtype).max], dtype=dtype)
    scale = torch.exp2(torch.randint(-40, 20, (64, 1), generator=gen).float())
    x = (torch.randn(64, 257, generator=gen) * scale).to(dtype)
    for name in CODECS:
        payload = ref.encode(name, x.float())
        got, exp = cache.clone(), cache.clone()
        cpu.decode_tensors(name, payload, (64, 257), dtype, base=got)
        ref.decode_residual(name, payload, exp)
        assert torch.equal(got.view(torch.int16), exp.view(torch.int16)), name
        plain = cpu.decode_tensors(name, payload, (64, 257), dtype)
        assert torch.equal(plain.view(torch.int16), ref.to_dtype(ref.deq(name, payload, 257), dtype).view(torch.int16))


@SLOW
@needs_numba
def test_non_contiguous_caches_and_bad_payloads(compiled):
    codec = codecs.get("int4")
    x = torch.randn(6, 10)
    wide = torch.zeros(6, 20)
    cache = wide[:, ::2]  # not contiguous
    twin = torch.zeros(6, 10)
    p = codec.encode_residual(x, cache)
    codec.decode_residual(p, twin)
    assert torch.equal(cache, twin) and not torch.equal(cache, torch.zeros(6, 10))
    with pytest.raises(ValueError, match="layout"):
        cpu.decode_tensors("int4", (p.tensors[0][:, :-1], p.tensors[1]), (6, 10), torch.float32)
    with pytest.raises(ValueError, match="layout"):
        cpu.decode_tensors("int4", (p.tensors[0], p.tensors[1][:-1]), (6, 10), torch.float32)
    with pytest.raises(ValueError, match="lowrank-4"):
        cpu.encode_tensors("lowrank-4", x)
    with pytest.raises(ValueError, match="base cache .* does not match x"):
        cpu.encode_tensors("int4", x, torch.zeros(6, 11))


def test_force_torch_selects_the_reference(monkeypatch):
    x = torch.zeros(4, 8, dtype=torch.bfloat16)
    monkeypatch.setenv("CFX_FORCE_TORCH", "1")
    assert not cpu.supports("int4", x)
    assert codec_base._fused_backend("int4", x) is None
    assert not codec_base._fused_supports("1bit", x)


def test_only_quantising_codecs_on_cpu_tensors():
    x = torch.zeros(4, 8)
    for name in ("none", "lowrank-4"):
        assert not cpu.supports(name, x)
    assert not cpu.supports("int4", x.view(-1))


def test_a_missing_numba_is_said_once_and_the_torch_path_takes_over(fresh_loader, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(_loader.importlib.util, "find_spec",
                        lambda name, *a: None if name == "numba" else real(name, *a))
    codec = codecs.get("int4")
    x = torch.randn(5, 7)
    with pytest.warns(RuntimeWarning, match="numba not installed") as record:
        for _ in range(3):
            assert not cpu.supports("int4", x)
            p = codec.encode_residual(x, torch.zeros(5, 7))
    assert len([w for w in record if "compiled CPU codecs unavailable" in str(w.message)]) == 1
    assert p.nbytes == codec.payload_nbytes((5, 7), torch.float32)
    assert cpu.status().startswith("unavailable")


def test_cfx_cpu_kernels_0_keeps_the_codec_base_on_torch(monkeypatch):
    from compactfusion_xdit.codecs import base

    def no_backend():
        raise AssertionError("the compiled CPU path was consulted with CFX_CPU_KERNELS=0")

    monkeypatch.setenv("CFX_CPU_KERNELS", "0")
    monkeypatch.setattr(base, "_cpu_backend", no_backend)
    assert base._fused_backend("int4", torch.randn(8, 16)) is None
    assert base._block_backend("int4", torch.randn(2, 8, 16)) is None
