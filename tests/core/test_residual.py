"""Residual channels and the compression names: the specification of config.py and residual.py."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from compactfusion_xdit import codecs
from compactfusion_xdit.core.config import PATHS, CompressionConfig, valid_names
from compactfusion_xdit.core.residual import MessageKind, ResidualState, fallback_follows

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
    kind = sender.message_kind(key, tuple(x.shape), x.dtype)
    assert kind is receiver.message_kind(key, tuple(x.shape), x.dtype)
    if kind is MessageKind.RAW:
        return x.clone()
    if kind is MessageKind.SEED:
        sender.seed_sender(key, x)
        y = x.clone()
        receiver.seed_receiver(key, y)
        return y
    msg = sender.encode(key, x)
    assert msg.wire.numel() == sender.wire_nbytes(tuple(x.shape), x.dtype)
    fallback = None if msg.fallback is None else msg.fallback.clone()
    return receiver.decode(key, msg.wire.clone(), tuple(x.shape), x.dtype, fallback=fallback)


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
def test_shape_dtype_change_or_reset_reseeds_with_a_raw_message(change):
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
    msg = sender.encode(KEY, x)
    assert fallback_follows(msg.wire) and msg.fallback is x
    y = receiver.decode(KEY, msg.wire, tuple(x.shape), x.dtype, fallback=x.clone())
    assert torch.equal(y, x)
    assert torch.equal(sender.cache("send", KEY), x.reshape(-1, 128)) and torch.equal(receiver.cache("recv", KEY), x.reshape(-1, 128))
    assert sender.stats()["reseed_fallbacks"] == 1
    sender.set_step(3)
    receiver.set_step(3)
    x3 = xs[3][: x.shape[0]].to(x.dtype)
    msg = sender.encode(KEY, x3)
    assert not fallback_follows(msg.wire)
    receiver.decode(KEY, msg.wire, tuple(x3.shape), x3.dtype)
    assert torch.equal(sender.cache("send", KEY), receiver.cache("recv", KEY))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_goes_raw_never_enters_a_cache_and_next_step_is_clean(bad):
    sender, receiver = pair("residual-int4")
    xs = drifting(5)
    for step in range(2):
        sender.set_step(step)
        receiver.set_step(step)
        transmit(sender, receiver, KEY, xs[step])
    sender.set_step(2)
    receiver.set_step(2)
    x = xs[2].clone()
    x[3, 5] = bad
    y = transmit(sender, receiver, KEY, x)
    assert torch.equal(y, x) or (torch.isnan(y[3, 5]) and torch.equal(y.nan_to_num(0), x.nan_to_num(0)))
    assert sender.cache("send", KEY) is None and receiver.cache("recv", KEY) is None
    assert sender.stats()["nonfinite_fallbacks"] == 1 and sender.stats()["raw_fallbacks"] == 1
    sender.set_step(3)
    receiver.set_step(3)
    y = transmit(sender, receiver, KEY, xs[3])  # re-seed: exact, caches clean
    assert torch.equal(y, xs[3])
    assert torch.equal(sender.cache("send", KEY), xs[3]) and torch.equal(receiver.cache("recv", KEY), xs[3])
    sender.set_step(4)
    receiver.set_step(4)
    y = transmit(sender, receiver, KEY, xs[4])
    assert torch.isfinite(y).all() and float((y - xs[4]).norm() / xs[4].norm()) < 0.2
    assert torch.equal(sender.cache("send", KEY), receiver.cache("recv", KEY))


def test_non_finite_warmup_tensor_is_not_cached():
    sender, receiver = pair("residual-int4")
    x = torch.ones(4, 8)
    x[0, 0] = float("nan")
    y = transmit(sender, receiver, KEY, x)
    assert torch.isnan(y[0, 0])
    assert sender.cache("send", KEY) is None and receiver.cache("recv", KEY) is None


def test_payload_without_receiver_cache_is_reported_not_guessed():
    sender, receiver = pair("residual-int4")
    x = drifting(1)[0]
    sender.seed_sender(KEY, x)
    sender.set_step(1)
    receiver.set_step(1)
    msg = sender.encode(KEY, x * 1.1)
    with pytest.raises(RuntimeError, match="out of sync"):
        receiver.decode(KEY, msg.wire, tuple(x.shape), x.dtype)


def test_stats_count_what_the_communicator_records():
    state = ResidualState("residual-int4")
    state.set_step(1)
    n = state.wire_nbytes((64, 128), torch.float32)
    assert n == codecs.get("int4").payload_nbytes((64, 128), torch.float32) + 1
    state.record("ulysses", MessageKind.CODED, 3 * 64 * 128 * 4, 3 * n, 3)
    state.record("ring", MessageKind.SEED, 100, 100)
    s = state.stats()
    assert (s["raw_bytes"], s["sent_bytes"], s["messages"]) == (3 * 64 * 128 * 4 + 100, 3 * n + 100, 4)
    assert s["paths"]["ulysses"]["coded_messages"] == 3 and s["paths"]["ring"]["raw_messages"] == 1
    assert s["compression"] == "residual-int4"


# --------------------------------------------------------------------------------------------
# Several keys at once (encode_many / decode_many): the bytes and caches of one call per key
# --------------------------------------------------------------------------------------------


def keyed_messages(sender, receiver, keys, xs, many: bool):
    """One CODED step for several keys, batched or one call per key: (wires, outputs)."""
    n = sender.wire_nbytes(tuple(xs[0].shape), xs[0].dtype, keys[0])
    wires = [torch.full((n,), 7, dtype=torch.uint8) for _ in keys]
    finite = [bool(torch.isfinite(x).all()) for x in xs]
    if many:
        msgs = sender.encode_many(keys, xs, wires, finite)
    else:
        msgs = [sender.encode(k, x, out=w, finite=f) for k, x, w, f in zip(keys, xs, wires, finite)]
    fallbacks = [None if m.fallback is None else m.fallback.clone() for m in msgs]
    outs = [torch.empty_like(x) for x in xs]
    if many:
        receiver.decode_many(keys, [w.clone() for w in wires], tuple(xs[0].shape), xs[0].dtype, outs, fallbacks)
    else:
        for k, w, o, f in zip(keys, wires, outs, fallbacks):
            receiver.decode(k, w.clone(), tuple(xs[0].shape), xs[0].dtype, fallback=f, out=o)
    return wires, outs


@settings(max_examples=30, deadline=None)
@given(
    codec=st.sampled_from(available("int8", "int4", "int2", "1bit")),
    mode=st.sampled_from(["residual-", ""]),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    shape=st.sampled_from([(5, 7), (3, 2, 9), (1, 1), (16, 33)]),
    count=st.integers(2, 4),
    ef=st.booleans(),
    unseeded=st.booleans(),
    poison=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_many_keys_at_once_equal_one_call_per_key(codec, mode, dtype, shape, count, ef, unseeded, poison, seed):
    keys = [("ulysses", 0, "q", 0, peer) for peer in range(1, count + 1)]
    streams = [drifting(4, shape=shape, seed=seed + i) for i in range(count)]
    one, many = pair(mode + codec, error_feedback=ef), pair(mode + codec, error_feedback=ef)
    for step in range(4):
        xs = [s[step].to(dtype) for s in streams]
        if poison and step == 2:
            xs[-1] = xs[-1].clone().view(-1).index_fill_(0, torch.tensor([0]), float("nan")).view(shape)
        for state in (*one, *many):
            state.set_step(step)
            if unseeded and step == 3:
                state.reset(keys[0])  # one key re-seeds: that message goes raw, the others still code
        if one[0].message_kind(keys[0], shape, dtype) is not MessageKind.CODED:
            for states in (one, many):
                for k, x in zip(keys, xs):
                    transmit(*states, k, x)
            continue
        wires_one, outs_one = keyed_messages(*one, keys, xs, many=False)
        wires_many, outs_many = keyed_messages(*many, keys, xs, many=True)
        for a, b in zip(wires_one, wires_many):
            assert torch.equal(a, b)
        for a, b in zip(outs_one, outs_many):
            assert torch.equal(a.view(torch.uint8) if a.dtype != torch.float32 else a.view(torch.int32),
                               b.view(torch.uint8) if b.dtype != torch.float32 else b.view(torch.int32))
        assert one[0].cache_digests() == many[0].cache_digests()
        assert one[1].cache_digests() == many[1].cache_digests()


def test_row_independent_codecs_are_the_per_row_ones():
    assert all(codecs.get(n).rows_independent for n in ("int8", "int4", "int2"))
    assert not any(codecs.get(n).rows_independent for n in available("1bit", "lowrank-4"))
