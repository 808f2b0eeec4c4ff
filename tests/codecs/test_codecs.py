"""Codec library: round-trip bounds, exact wire sizes, residual caches, registry (torch path)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from compactfusion_xdit import codecs
from compactfusion_xdit.codecs.base import bf16_round

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LOSSY = ["int8", "int4", "int2", "1bit", "lowrank-4"]
ALL = ["none"] + LOSSY
# float32 -> dtype rounding: half an ulp, relative
REL_ROUND = {torch.float32: 2**-24, torch.float16: 2**-11, torch.bfloat16: 2**-8}

shapes = st.tuples(st.integers(1, 40), st.integers(1, 70))


def sample(shape, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype)


@settings(max_examples=60, deadline=None)
@given(shape=shapes, dtype=st.sampled_from(DTYPES), name=st.sampled_from(ALL), seed=st.integers(0, 2**16))
def test_payload_size_depends_only_on_codec_shape_dtype(shape, dtype, name, seed):
    c = codecs.get(name)
    p = c.encode(sample(shape, dtype, seed))
    assert p.nbytes == c.payload_nbytes(shape, dtype) == p.flatten().numel()
    assert c.decode(p).shape == shape and c.decode(p).dtype == dtype


@pytest.mark.parametrize("n,c", [(1, 1), (5, 3), (7, 3072), (4096, 3072)])
def test_packed_sizes_match_the_wire_table(n, c):
    f16 = torch.float16
    assert codecs.get("none").payload_nbytes((n, c), f16) == n * c * 2
    assert codecs.get("int8").payload_nbytes((n, c), f16) == n * c + 2 * n
    assert codecs.get("int4").payload_nbytes((n, c), f16) == n * math.ceil(c / 2) + 2 * n
    assert codecs.get("int2").payload_nbytes((n, c), f16) == n * math.ceil(c / 4) + 2 * n
    assert codecs.get("1bit").payload_nbytes((n, c), f16) == n * math.ceil(c / 8) + 2 * c + 2 * n
    r = min(8, n, c)
    assert codecs.get("lowrank-8").payload_nbytes((n, c), f16) == (n + c) * r * 2


@pytest.mark.parametrize("n", [4096, 16384])
def test_scale_overhead_at_most_two_percent_at_3072_channels(n):
    c = 3072
    for name, bits in [("int8", 8), ("int4", 4), ("int2", 2), ("1bit", 1)]:
        data = n * math.ceil(c * bits / 8)
        assert codecs.get(name).payload_nbytes((n, c), torch.float16) <= data * 1.02


def test_1bit_overhead_at_small_n_is_as_documented():
    c, n = 3072, 1024  # docs/codec_format.md: 2.1 % at N = 1024, over 2 % below N = 1082
    data = n * c // 8
    assert codecs.get("1bit").payload_nbytes((n, c), torch.float16) - data == 2 * c + 2 * n
    assert 0.02 < (2 * c + 2 * n) / data < 0.021


@settings(max_examples=60, deadline=None)
@given(shape=shapes, dtype=st.sampled_from(DTYPES), name=st.sampled_from(ALL), seed=st.integers(0, 2**16))
def test_flatten_unflatten_round_trip_is_exact(shape, dtype, name, seed):
    c = codecs.get(name)
    p = c.encode(sample(shape, dtype, seed))
    q = c.unflatten(p.flatten().clone(), shape, dtype)
    assert torch.equal(p.flatten(), q.flatten())
    assert [t.shape for t in p.tensors] == [t.shape for t in q.tensors]
    assert torch.equal(c.decode(p), c.decode(q))


@settings(max_examples=40, deadline=None)
@given(shape=shapes, dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_none_is_bitwise_identity(shape, dtype, seed):
    x = sample(shape, dtype, seed)
    c = codecs.get("none")
    assert torch.equal(c.decode(c.encode(x)).view(torch.uint8), x.view(torch.uint8))


@settings(max_examples=80, deadline=None)
@given(shape=shapes, dtype=st.sampled_from(DTYPES), bits=st.sampled_from([8, 4]), seed=st.integers(0, 2**16))
def test_absmax_error_is_at_most_half_a_step(shape, dtype, bits, seed):
    x = sample(shape, dtype, seed, scale=3.0)
    c = codecs.get(f"int{bits}")
    xf = x.float()
    y = c.decode(c.encode(x)).float()
    qmax = 2 ** (bits - 1) - 1
    s = bf16_round(xf.abs().amax(1) / qmax)[:, None]
    # bf16 rounding of s may put the row's max a little past qmax*s: allow that clamp error too
    bound = s / 2 + (xf.abs().amax(1, keepdim=True) - qmax * s).clamp(min=0)
    bound = bound * (1 + 1e-6) + xf.abs() * REL_ROUND[dtype] * 2
    assert torch.all((y - xf).abs() <= bound)


@settings(max_examples=60, deadline=None)
@given(shape=shapes, dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_int2_decodes_to_its_four_levels_and_never_flips_sign(shape, dtype, seed):
    x = sample(shape, dtype, seed)
    c = codecs.get("int2")
    p = c.encode(x)
    d = p.tensors[1].float()[:, None]
    y = c.decode_float(p)
    levels = torch.round(y / torch.where(d > 0, d, 1.0) - 0.5)
    assert torch.all((levels >= -2) & (levels <= 1))
    assert torch.all((y * x.float() >= 0) | (x.float().abs() < d))  # a level of the other sign only near 0


@settings(max_examples=60, deadline=None)
@given(shape=shapes, dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_1bit_keeps_the_sign_and_the_rank1_magnitude(shape, dtype, seed):
    x = sample(shape, dtype, seed)
    c = codecs.get("1bit")
    y = c.decode_float(c.encode(x))
    xf = x.float()
    assert torch.all(torch.where(xf >= 0, y >= 0, y <= 0))
    a = xf.abs()
    expect = a.mean(0)[None, :] * (a.mean(1) / a.mean(1).mean())[:, None]
    assert torch.allclose(y.abs(), expect, rtol=2**-7, atol=1e-6)


@settings(max_examples=60, deadline=None)
@given(shape=st.tuples(st.integers(2, 40), st.integers(2, 70)), dtype=st.sampled_from(DTYPES),
       name=st.sampled_from(LOSSY), seed=st.integers(0, 2**16))
def test_codecs_are_contractive(shape, dtype, name, seed):
    x = sample(shape, dtype, seed)
    y = codecs.get(name).decode(codecs.get(name).encode(x)).float()
    assert (y - x.float()).norm() < x.float().norm()


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", DTYPES)
def test_edge_values_decode_finite(name, dtype):
    big = torch.finfo(dtype).max if dtype == torch.float16 else 1e4
    rows = [
        torch.zeros(9),
        torch.full((9,), 3.25),
        torch.tensor([1e-8, -1e-8, 1e4, -1e4, 1.0, 0.0, 3e-5, -7.0, 2.0]),
        torch.tensor([big, -big, big, 0.5, -0.5, 1.0, big, -big, 0.0]),
    ]
    for row in rows:
        x = row.repeat(3, 1).to(dtype)
        y = codecs.get(name).decode(codecs.get(name).encode(x))
        assert torch.isfinite(y).all(), (name, row)
        if not x.float().any():
            assert not y.float().any()


@pytest.mark.parametrize("name", ["int8", "int4", "lowrank-2"])
def test_fp16_at_its_largest_value_decodes_finite_and_close(name):
    # int8: bf16(65504/127) = 516 and 127 * 516 = 65532 > 65504, saved by the saturating cast;
    # lowrank: the unbalanced factor xᵀQ would reach √N · 65504 and overflow float16.
    x = torch.full((64, 48), 65504.0).to(torch.float16)
    x[:, ::2] = -65504.0
    c = codecs.get(name)
    p = c.encode(x)
    assert all(torch.isfinite(t.float()).all() for t in p.tensors if t.is_floating_point())
    y = c.decode(p).float()
    assert torch.isfinite(y).all()
    assert (y - x.float()).abs().max() <= 65504 * 0.01


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", DTYPES)
def test_residual_caches_stay_bitwise_equal(name, dtype):
    c = codecs.get(name)
    shape = (13, 29)
    sender, receiver = torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)
    for step in range(12):
        x = (sample(shape, torch.float32, 1) + 0.05 * step * sample(shape, torch.float32, 2 + step)).to(dtype)
        p = c.encode_residual(x, sender)
        c.decode_residual(c.unflatten(p.flatten(), shape, dtype), receiver)
        assert torch.equal(sender.view(torch.uint8), receiver.view(torch.uint8))


def test_error_feedback_off_caches_x():
    c = codecs.get("int4")
    x = sample((8, 16), torch.float16, 3)
    base = torch.zeros_like(x)
    c.encode_residual(x, base, error_feedback=False)
    assert torch.equal(base, x)


def test_residual_with_error_feedback_tracks_a_drifting_signal():
    c = codecs.get("int2")
    base = torch.zeros(64, 128)
    x = sample((64, 128), torch.float32, 0)
    errs = []
    for step in range(30):
        x = x + 0.02 * sample((64, 128), torch.float32, 100 + step)
        c.encode_residual(x, base)
        errs.append(((base - x).norm() / x.norm()).item())
    plain = codecs.get("int2")
    plain_err = ((plain.decode(plain.encode(x)) - x).norm() / x.norm()).item()
    assert errs[-1] < plain_err / 4, (errs[-1], plain_err)


def test_mismatched_cache_is_refused_with_a_reset_hint():
    c = codecs.get("int4")
    with pytest.raises(ValueError, match="reset"):
        c.encode_residual(torch.zeros(4, 8), torch.zeros(4, 9))


def test_non_2d_and_integer_inputs_are_refused_clearly():
    c = codecs.get("int8")
    with pytest.raises(ValueError, match="2-D"):
        c.encode(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        c.encode(torch.zeros(2, 3, dtype=torch.int32))


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ValueError, match="int4.*1bit.*lowrank-<R>"):
        codecs.get("int3")
    for bad in ["lowrank-0", "lowrank-x", "lowrank-"]:
        with pytest.raises(ValueError, match="positive integer"):
            codecs.get(bad)
    assert codecs.get("lowrank-16").name == "lowrank-16"


def test_user_codec_registers_and_works_by_name():
    class Halves(codecs.Codec):
        name = "halves"

        def layout(self, shape, dtype):
            return [(tuple(shape), torch.float16)]

        def _encode_values(self, v, dtype):
            return (v.to(torch.float16),)

        def _decode_values(self, tensors, shape, dtype):
            return tensors[0].float()

    codecs.register("halves", Halves)
    try:
        assert "halves" in codecs.names()
        x16 = torch.randn(6, 7).half()
        base, receiver = torch.zeros_like(x16), torch.zeros_like(x16)
        p = codecs.get("halves").encode_residual(x16, base)
        codecs.get("halves").decode_residual(p, receiver)
        assert torch.equal(base, x16) and torch.equal(receiver, x16)
        x = torch.randn(3, 5)
        c = codecs.get("halves")
        assert torch.equal(c.decode(c.encode(x)), x.half().float())
        assert c.encode(x).nbytes == 30
        with pytest.raises(ValueError, match="built-in"):
            codecs.register("int4", Halves)
    finally:
        codecs.unregister("halves")
    assert "halves" not in codecs.names()


def test_replacing_a_builtin_needs_replace_and_is_listed_once():
    class Int8Twin(type(codecs.get("int8"))):
        def __init__(self):
            super().__init__(8)

    codecs.register("int8", Int8Twin, replace=True)
    try:
        assert isinstance(codecs.get("int8"), Int8Twin)
        assert codecs.names().count("int8") == 1
    finally:
        codecs.unregister("int8")
    assert type(codecs.get("int8")) is not Int8Twin


def test_force_torch_env_keeps_the_reference_path(monkeypatch):
    from compactfusion_xdit.codecs import base

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("CFX_FORCE_TORCH", "1")
    assert not base._fused_supports("int4", torch.zeros(2, 3))


def test_benchmark_quick_run_reports_every_codec(tmp_path):
    import importlib.util
    import json
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "..", "scripts", "bench_codec.py")
    spec = importlib.util.spec_from_file_location("bench_codec", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "codec.json"
    assert bench.main(["--quick", "--path", "torch", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {r["codec"] for r in rows} == set(bench.DEFAULT_CODECS)
    assert {(r["codec"], r["mode"]) for r in rows} >= {(n, "residual") for n in ["int8", "int4", "int2", "1bit"]}
    for r in rows:
        assert r["payload_bytes"] == codecs.get(r["codec"]).payload_nbytes((r["N"], r["C"]), torch.float16)


def test_the_config_knows_the_builtin_codec_names_without_importing_torch():
    from compactfusion_xdit.core.config import BUILTIN_CODECS

    assert set(BUILTIN_CODECS) == {n for n in codecs.names() if n != "lowrank-<R>"} - set(codecs._user)
