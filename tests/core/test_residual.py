"""Residual channels and the compression names: the specification of config.py and residual.py."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from compactfusion_xdit import codecs
from compactfusion_xdit.core.config import PATHS, CompressionConfig, valid_names
from compactfusion_xdit.core.residual import MessageKind, ResidualState

KEY = ("ulysses", 0, "k", 0, 1)


def available(*names):
    """The codec names among `names` that codecs.get accepts."""
    out = []
    for n in names:
        try:
            codecs.get(n)
        except ValueError:
            continue
        out.append(n)
    return out


def transmit(sender: ResidualState, receiver: ResidualState, key, x: torch.Tensor) -> torch.Tensor:
    """One message from `sender` to `receiver` following the protocol; returns what arrives."""
    kind = sender.message_kind(key, tuple(x.shape), x.dtype, key, "send")
    assert kind is receiver.message_kind(key, tuple(x.shape), x.dtype, key, "recv")
    if kind is MessageKind.RAW:
        return x.clone()
    if kind is MessageKind.SEED:
        sender.seed_sender(key, x)
        y = x.clone()
        receiver.seed_receiver(key, y)
        return y
    wire = sender.encode(key, x)
    assert wire.numel() == sender.wire_nbytes(tuple(x.shape), x.dtype)
    return receiver.decode(key, wire.clone(), tuple(x.shape), x.dtype)


def pair(name: str, **overrides):
    config = CompressionConfig.parse(name, **overrides)
    return ResidualState(config), ResidualState(config)


def drifting(steps: int, shape=(64, 128), drift=0.2, seed=0):
    """x_t with adjacent-step residual about `drift` of the norm (cosine ~0.98)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    out = []
    for _ in range(steps):
        out.append(x.clone())
        x = (x + drift * torch.randn(shape, generator=g)) / (1 + drift**2) ** 0.5
    return out


def relative_errors(name: str, xs, **overrides) -> list[float]:
    sender, receiver = pair(name, **overrides)
    errors = []
    for step, x in enumerate(xs):
        sender.set_step(step)
        receiver.set_step(step)
        y = transmit(sender, receiver, KEY, x)
        errors.append(float((y.float() - x.float()).norm() / x.float().norm()))
    return errors


# ----- names -------------------------------------------------------------------------------------
def test_none_is_mode_none():
    c = CompressionConfig.parse("none")
    assert (c.codec, c.mode, c.enabled) == ("none", "none", False)
    assert CompressionConfig.parse(None) == c


@pytest.mark.parametrize("codec", available("int8", "int4", "int2", "1bit", "lowrank-8"))
def test_bare_and_plain_names_are_plain_mode(codec):
    assert CompressionConfig.parse(codec) == CompressionConfig.parse("plain-" + codec)
    c = CompressionConfig.parse(codec)
    assert (c.codec, c.mode, c.name) == (codec, "plain", codec)


@pytest.mark.parametrize("codec", available("int8", "int4", "int2", "1bit", "lowrank-8"))
def test_residual_names(codec):
    c = CompressionConfig.parse("residual-" + codec)
    assert (c.codec, c.mode, c.error_feedback, c.name) == (codec, "residual", True, "residual-" + codec)
    off = CompressionConfig.parse(f"residual-{codec}-noef")
    assert (off.mode, off.error_feedback, off.name) == ("residual", False, f"residual-{codec}-noef")
    assert CompressionConfig.parse("residual-" + codec, error_feedback=False) == off
    assert CompressionConfig.parse(off.name) == off


def test_overrides_and_defaults():
    c = CompressionConfig.parse("residual-int4", warmup=3, paths="ring, ulysses", check=True)
    assert (c.warmup, c.paths, c.check) == (3, ("ulysses", "ring"), True)
    d = CompressionConfig.parse("residual-int4")
    assert (d.warmup, d.paths, d.check) == (1, PATHS, False)
    assert CompressionConfig.parse(d, warmup=0).warmup == 0
    assert CompressionConfig.parse("int4", paths="all").paths == PATHS


def test_user_registered_codec_name():
    codecs.register("my-int8", lambda: codecs.get("int8"))
    try:
        c = CompressionConfig.parse("residual-my-int8-noef")
        assert (c.codec, c.mode, c.error_feedback) == ("my-int8", "residual", False)
        assert CompressionConfig.parse("my-int8").mode == "plain"
        assert "residual-my-int8" in valid_names()
    finally:
        codecs.unregister("my-int8")


@settings(max_examples=30, deadline=None)
@given(codec=st.sampled_from(available("int8", "int4", "int2", "1bit", "lowrank-8")), mode=st.sampled_from(["plain", "residual"]),
       ef=st.booleans(), warmup=st.integers(0, 10), paths=st.sets(st.sampled_from(PATHS), min_size=1))
def test_canonical_name_round_trips(codec, mode, ef, warmup, paths):
    c = CompressionConfig(codec=codec, mode=mode, error_feedback=ef or mode == "plain", warmup=warmup, paths=tuple(paths))
    assert CompressionConfig.parse(c.name, warmup=warmup, paths=",".join(paths)) == c


@pytest.mark.parametrize("bad", ["int5", "residual-", "residual-int9", "plain-none", "residual-none", "int4-noef", ""])
def test_wrong_name_lists_valid_names(bad):
    with pytest.raises(ValueError) as err:
        CompressionConfig.parse(bad)
    assert "residual-int4" in str(err.value) or "-noef" in str(err.value)


@pytest.mark.parametrize(
    "overrides, words",
    [({"warmup": -1}, "warmup"), ({"warmup": 1.5}, "warmup"), ({"paths": "ulysses,teleport"}, "pipefusion"),
     ({"paths": ""}, "ulysses"), ({"ef": False}, "error_feedback")],
)
def test_bad_settings_name_the_valid_values(overrides, words):
    with pytest.raises(ValueError, match=words):
        CompressionConfig.parse("residual-int4", **overrides)


def test_unknown_path_in_key_is_an_error():
    state = ResidualState(CompressionConfig.parse("residual-int4"))
    with pytest.raises(ValueError, match="ulysses"):
        state.message_kind(("teleport", 0), (4, 4), torch.float32)


# ----- the residual channel ---------------------------------------------------------------------
@pytest.mark.parametrize("codec", available("int4", "int2", "1bit"))
def test_residual_error_bounded_and_far_below_plain(codec):
    xs = drifting(50)
    residual = relative_errors("residual-" + codec, xs)
    plain = relative_errors(codec, xs)
    assert residual[0] == 0.0 and plain[0] == 0.0  # warm-up step: raw
    res_worst, plain_mean = max(residual[1:]), sum(plain[1:]) / 49
    # measured (int4/int2/1bit): residual worst 0.024/0.075/0.152, plain mean 0.117/0.344/0.596
    assert res_worst < 0.35 * plain_mean, (codec, res_worst, plain_mean)
    assert max(residual[25:]) < 1.5 * max(residual[1:25]) + 1e-6  # bounded: no growth over time


@pytest.mark.parametrize("codec", available("int4", "int2", "1bit"))
def test_without_error_feedback_the_error_grows(codec):
    xs = drifting(50)
    ef = relative_errors("residual-" + codec, xs)
    noef = relative_errors(f"residual-{codec}-noef", xs)
    assert sum(noef[40:]) / 10 > 2 * sum(noef[1:6]) / 5  # the receiver's drift accumulates
    assert sum(noef[40:]) > 2 * sum(ef[40:])


@settings(max_examples=25, deadline=None)
@given(
    codec=st.sampled_from(available("int8", "int4", "int2", "1bit", "lowrank-4")),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    shape=st.sampled_from([(5, 7), (3, 2, 9), (1, 1), (16, 33), (40,)]),
    ef=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_sender_and_receiver_caches_bitwise_equal_every_step(codec, dtype, shape, ef, seed):
    sender, receiver = pair("residual-" + codec, error_feedback=ef)
    xs = drifting(6, shape=shape, seed=seed)
    for step, x in enumerate(xs):
        x = x.to(dtype)
        sender.set_step(step)
        receiver.set_step(step)
        y = transmit(sender, receiver, KEY, x)
        assert y.shape == x.shape and y.dtype == dtype
        r = receiver.cache("recv", KEY)
        assert torch.equal(y.reshape(r.shape), r)
        if ef:
            assert torch.equal(sender.cache("send", KEY), r)
            assert sender.cache_digests()[("send", KEY)] == receiver.cache_digests()[("recv", KEY)]
        else:
            assert torch.equal(sender.cache("send", KEY), x.reshape(r.shape))


def test_warmup_steps_are_raw_and_seed_both_caches():
    sender, receiver = pair("residual-int4", warmup=2)
    xs = drifting(3)
    for step in (0, 1):
        sender.set_step(step)
        receiver.set_step(step)
        assert sender.message_kind(KEY, xs[step].shape, torch.float32) is MessageKind.SEED
        y = transmit(sender, receiver, KEY, xs[step])
        assert torch.equal(y, xs[step])
        assert torch.equal(sender.cache("send", KEY), xs[step]) and torch.equal(receiver.cache("recv", KEY), xs[step])
    sender.set_step(2)
    receiver.set_step(2)
    assert sender.message_kind(KEY, xs[2].shape, torch.float32) is MessageKind.CODED
    assert not torch.equal(transmit(sender, receiver, KEY, xs[2]), xs[2])


def test_none_plain_and_uncoded_dtypes_send_raw():
    state = ResidualState("none")
    state.set_step(5)
    assert state.message_kind(KEY, (4, 4), torch.float32) is MessageKind.RAW
    plain = ResidualState("int4")
    assert plain.message_kind(KEY, (4, 4), torch.float32) is MessageKind.RAW  # plain warm-up: raw, no cache
    plain.set_step(1)
    assert plain.message_kind(KEY, (4, 4), torch.float32) is MessageKind.CODED
    for dtype in (torch.uint8, torch.int32, torch.float64, torch.float8_e4m3fn):
        assert plain.message_kind(KEY, (4, 4), dtype) is MessageKind.RAW
    assert plain.message_kind(KEY, (0, 4), torch.float32) is MessageKind.RAW
    only_ring = ResidualState(CompressionConfig.parse("int4", paths="ring"))
    only_ring.set_step(1)
    assert only_ring.message_kind(KEY, (4, 4), torch.float32) is MessageKind.RAW
    assert only_ring.message_kind(("ring", 0), (4, 4), torch.float32) is MessageKind.CODED


def test_plain_mode_decodes_x_itself_and_keeps_no_cache():
    sender, receiver = pair("int4")
    x = drifting(1)[0]
    sender.set_step(1)
    receiver.set_step(1)
    y = transmit(sender, receiver, KEY, x)
    codec = codecs.get("int4")
    assert torch.equal(y, codec.decode(codec.encode(x)))
    assert sender.stats()["cache_entries"] == 0 and receiver.stats()["cache_entries"] == 0


def test_begin_request_clears_all_caches_and_step():
    sender, receiver = pair("residual-int4")
    for step, x in enumerate(drifting(3)):
        sender.set_step(step)
        receiver.set_step(step)
        transmit(sender, receiver, KEY, x)
    assert sender.stats()["cache_entries"] == 1 and receiver.stats()["cache_bytes"] == 64 * 128 * 4
    sender.begin_request()
    assert sender.step == 0 and sender.stats()["cache_entries"] == 0 and sender.cache("send", KEY) is None


@pytest.mark.parametrize("change", ["shape", "dtype", "reset"])
def test_shape_dtype_change_or_reset_makes_both_ends_seed(change):
    sender, receiver = pair("residual-int4")
    xs = drifting(4)
    for step in range(2):
        sender.set_step(step)
        receiver.set_step(step)
        transmit(sender, receiver, KEY, xs[step])
    sender.set_step(2)
    receiver.set_step(2)
    x = {"shape": xs[2][:32], "dtype": xs[2].to(torch.bfloat16), "reset": xs[2]}[change]
    if change == "reset":
        sender.reset(KEY)
        receiver.reset(KEY)
    assert sender.message_kind(KEY, tuple(x.shape), x.dtype, KEY, "send") is MessageKind.SEED
    assert receiver.message_kind(KEY, tuple(x.shape), x.dtype, KEY, "recv") is MessageKind.SEED
    y = transmit(sender, receiver, KEY, x)
    assert torch.equal(y, x)
    assert torch.equal(sender.cache("send", KEY), x.reshape(-1, 128)) and torch.equal(receiver.cache("recv", KEY), x.reshape(-1, 128))
    sender.set_step(3)
    receiver.set_step(3)
    x3 = xs[3][: x.shape[0]].to(x.dtype)
    assert sender.message_kind(KEY, tuple(x3.shape), x3.dtype, KEY, "send") is MessageKind.CODED
    transmit(sender, receiver, KEY, x3)
    assert torch.equal(sender.cache("send", KEY), receiver.cache("recv", KEY))


@pytest.mark.parametrize("codec", available("int8", "int4", "int2", "1bit", "lowrank-4"))
@pytest.mark.parametrize("mode", ["residual-", ""])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_rows_travel_marked_never_enter_a_cache_and_next_step_is_clean(codec, mode, bad):
    sender, receiver = pair(mode + codec)
    xs = drifting(5)
    for step in range(2):
        sender.set_step(step)
        receiver.set_step(step)
        transmit(sender, receiver, KEY, xs[step])
    sender.set_step(2)
    receiver.set_step(2)
    before = None if not mode else sender.cache("send", KEY).clone()
    x = xs[2].clone()
    x[3, 5] = bad
    x[7, 0] = bad
    y = transmit(sender, receiver, KEY, x)
    rows_nan = y.isnan().all(dim=1)
    assert rows_nan.tolist() == [i in (3, 7) for i in range(64)]  # exactly the marked rows, wholly
    assert torch.isfinite(y[~rows_nan]).all()
    assert sender.stats()["nonfinite_rows"] == 2
    if mode:
        send, recv = sender.cache("send", KEY), receiver.cache("recv", KEY)
        assert torch.isfinite(send).all() and torch.equal(send, recv)
        assert torch.equal(send[[3, 7]], before[[3, 7]])  # marked rows keep their cache value
    for step in (3, 4):
        sender.set_step(step)
        receiver.set_step(step)
        y = transmit(sender, receiver, KEY, xs[step])
        assert torch.isfinite(y).all()
    if mode:
        assert torch.equal(sender.cache("send", KEY), receiver.cache("recv", KEY))
        assert float((y - xs[4]).norm() / xs[4].norm()) < (0.2 if codec in ("int8", "int4") else 0.6)


def test_non_finite_warmup_rows_are_cached_as_zeros_on_both_ends():
    sender, receiver = pair("residual-int4")
    x = torch.ones(4, 8)
    x[0, 0] = float("nan")
    y = transmit(sender, receiver, KEY, x)
    assert torch.isnan(y[0, 0])  # the raw tensor arrives as it was
    expect = x.clone()
    expect[0] = 0
    assert torch.equal(sender.cache("send", KEY), expect) and torch.equal(receiver.cache("recv", KEY), expect)


def test_payload_without_receiver_cache_is_reported_not_guessed():
    sender, receiver = pair("residual-int4")
    x = drifting(1)[0]
    sender.seed_sender(KEY, x)
    sender.set_step(1)
    receiver.set_step(1)
    wire = sender.encode(KEY, x * 1.1)
    with pytest.raises(RuntimeError, match="out of sync"):
        receiver.decode(KEY, wire, tuple(x.shape), x.dtype)


def test_stats_count_what_the_communicator_records():
    state = ResidualState("residual-int4")
    state.set_step(1)
    n = state.wire_nbytes((64, 128), torch.float32)
    assert n == codecs.get("int4").payload_nbytes((64, 128), torch.float32)  # the payload, nothing else
    state.record("ulysses", MessageKind.CODED, 3 * 64 * 128 * 4, 3 * n, 3)
    state.record("ring", MessageKind.SEED, 100, 100)
    s = state.stats()
    assert (s["raw_bytes"], s["sent_bytes"], s["messages"]) == (3 * 64 * 128 * 4 + 100, 3 * n + 100, 4)
    assert s["paths"]["ulysses"]["coded_messages"] == 3 and s["paths"]["ring"]["raw_messages"] == 1
    assert s["compression"] == "residual-int4"


# --------------------------------------------------------------------------------------------
# Several messages in one wire buffer (Codec.encode_block / decode_block): the bytes and caches of
# one message at a time
# --------------------------------------------------------------------------------------------


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32) if t.dtype == torch.float32 else t.view(torch.int16)


@settings(max_examples=30, deadline=None)
@given(
    codec=st.sampled_from(available("int8", "int4", "int2", "1bit", "lowrank-2")),
    residual=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    shape=st.sampled_from([(5, 7), (1, 1), (16, 33)]),
    count=st.integers(1, 4),
    offset=st.integers(0, 3),
    ef=st.booleans(),
    poison=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_block_of_messages_equals_one_message_at_a_time(codec, residual, dtype, shape, count, offset, ef, poison, seed):
    c = codecs.get(codec)
    g = torch.Generator().manual_seed(seed)
    x3 = torch.randn((count, *shape), generator=g).to(dtype)
    if poison:
        x3[-1, 0, 0] = float("nan")
    base3 = torch.randn((count, *shape), generator=g).to(dtype) if residual else None
    n = c.payload_nbytes(shape, dtype)
    wire = torch.full((count, offset + n + 2), 7, dtype=torch.uint8)
    block_base = None if base3 is None else base3.clone()
    c.encode_block(x3, block_base, wire, offset, residual, ef)
    for i in range(count):
        one = torch.full((1, n), 7, dtype=torch.uint8)
        one_base = None if base3 is None else base3[i:i + 1].clone()
        c.encode_block(x3[i:i + 1], one_base, one, 0, residual, ef)
        assert torch.equal(wire[i, offset:offset + n], one[0])
        assert (wire[i, :offset] == 7).all() and (wire[i, offset + n:] == 7).all()
        if residual:
            assert torch.equal(_bits(block_base[i]), _bits(one_base[0]))
    recv_base = None if base3 is None else base3.clone()
    out = torch.empty_like(x3)
    c.decode_block(wire, offset, recv_base, out, residual)
    if residual:
        assert torch.isfinite(recv_base).all()
        if ef:  # without error feedback the sender caches x, not the reconstruction
            assert torch.equal(_bits(recv_base), _bits(block_base))
    if poison:
        assert out[-1, 0].isnan().all()
        out[-1, 0] = 0
    assert torch.isfinite(out).all()


def test_row_independent_codecs_are_the_per_row_ones():
    assert all(codecs.get(n).rows_independent for n in ("int8", "int4", "int2"))
    assert not any(codecs.get(n).rows_independent for n in available("1bit", "lowrank-4"))
