"""``--compression auto``: per-path codec from the measured link (compactfusion_xdit/core/auto.py).

The link rate is faked through ``$CFX_AUTO_LINK_MBPS`` (`auto.link_seconds`), so no test depends on
real timings: a slow fake link makes coding pay (the floor wins), a fast one makes it not pay (none).
"""

from __future__ import annotations

import argparse

import pytest
import torch

from compactfusion_xdit.cli import dry_run, yaml_config
from compactfusion_xdit.cli import flags as cli_args
from compactfusion_xdit.core import auto
from compactfusion_xdit.core.config import CompressionConfig
from compactfusion_xdit.core.residual import MessageKind, ResidualState
from compactfusion_xdit.rank.traffic import format_auto
from compactfusion_xdit.testing import run_ranks

SLOW, FAST = "0.001", "1e9"  # MB/s


# ----- config, flags, YAML, dry run ------------------------------------------------------------

def test_auto_parses_with_its_settings_and_refuses_warmup_0_naming_the_fix():
    config = CompressionConfig.parse("auto", auto_floor="residual-1bit", auto_every=3)
    assert (config.mode, config.codec, config.name, config.enabled) == ("auto", "auto", "auto", True)
    assert config.to_dict()["auto_floor"] == "residual-1bit" and config.to_dict()["auto_every"] == 3
    with pytest.raises(ValueError, match="--compression-warmup 1 or more"):
        CompressionConfig.parse("auto", warmup=0)
    with pytest.raises(ValueError, match="auto floor 'int4'"):
        CompressionConfig.parse("auto", auto_floor="int4")


def _namespace(argv):
    parser = argparse.ArgumentParser()
    cli_args.add_compression_args(parser)
    return parser.parse_args(argv)


def test_the_flags_build_an_auto_config_and_the_dry_run_says_it_decides_at_run_time():
    ns = _namespace(["--compression", "auto", "--compression-auto-floor", "residual-int4",
                     "--compression-auto-every", "5", "--compression-no-ef"])
    config = cli_args.compression_config(ns)
    assert (config.name, config.auto_floor, config.auto_every, config.error_feedback) == ("auto", "residual-int4", 5, False)
    lines = dry_run._compression(ns)
    assert any(line.startswith("  auto         decides at run time") and "residual-int4" in line for line in lines), lines
    with pytest.raises(SystemExit):
        _namespace(["--compression-auto-floor", "int3"])
    with pytest.raises(ValueError, match="--compression-warmup"):
        cli_args.compression_config(_namespace(["--compression", "auto", "--compression-warmup", "0"]))


@pytest.mark.parametrize("layout", [["--pipefusion_parallel_degree", "2"], ["--step_parallel_degree", "2"]])
def test_pipefusion_and_step_parallelism_take_auto_and_the_dry_run_says_when_it_agrees(layout):
    report = dry_run.report(["--model", "tiny-flux", *layout, "--compression", "auto"])
    assert ("  auto         decides at run time: per path, the link and codec costs measured in the first request "
            "(sent raw), agreed at the start of the next, candidates none .. residual-int2") in report
    lockstep = dry_run.report(["--model", "tiny-flux", "--ulysses_degree", "2", "--compression", "auto"])
    assert "measured in the warm-up, agreed at the first coded step" in lockstep


def test_yaml_compression_codec_auto(tmp_path):
    path = tmp_path / "auto.yaml"
    path.write_text("compression: {codec: auto, auto_floor: residual-1bit, auto_every: 2}\n")
    argv = yaml_config.read(str(path)).argv()
    config = cli_args.compression_config(_namespace(argv))
    assert (config.name, config.auto_floor, config.auto_every) == ("auto", "residual-1bit", 2)


# ----- the decision, in one process ------------------------------------------------------------

def _view(mbps, nbytes, costs):
    return {"bytes_per_step": nbytes, "MBps": mbps, "codecs": costs}


def test_decide_takes_the_slowest_rank_and_prefers_none_on_ties():
    costs = {"none": (1.0, 0.0), "residual-int8": (0.25, 1e-9), "residual-int4": (0.13, 1e-9)}
    names = ("none", "residual-int8", "residual-int4")
    fast = _view(1e6, 1e6, costs)
    slow = _view(1.0, 1e6, costs)
    decision, report = auto.decide([{"measured": {"ulysses": fast}}, {"measured": {"ulysses": slow}}], names)
    assert decision == {"ulysses": "residual-int4"} and report["ulysses"]["link_MBps"] == 1.0
    assert set(report["ulysses"]["candidates"]) == set(names)
    free = {n: (1.0, 0.0) for n in names}  # coding saves nothing: none
    assert auto.decide([{"measured": {"ring": _view(1.0, 10, free)}}], names)[0] == {"ring": "none"}


def test_a_codec_that_saves_less_than_the_margin_loses_to_none():
    names = ("none", "residual-int4")
    # none: 1 MB at 1 MB/s = 1 s; int4: 0.5 s of transfer + coding that leaves it just under or over the margin
    for coding, expected in ((1.0 - auto.CODING_MARGIN - 0.5 + 0.01, "none"), (0.2, "residual-int4")):
        costs = {"none": (1.0, 0.0), "residual-int4": (0.5, coding / 1e6)}
        assert auto.decide([{"measured": {"ulysses": _view(1.0, 1e6, costs)}}], names)[0] == {"ulysses": expected}


def test_a_transfer_that_hides_behind_compute_is_not_worth_coding():
    """What counts is the raw wait at the point of use: a pipeline's transfer that ran alongside its
    compute left none, so coding only costs its encode + decode and none wins; a wait is shortened
    by what the payload saves on the link, never below 0."""
    names = ("none", "residual-int4")
    costs = {"none": (1.0, 0.0), "residual-int4": (0.25, 0.05 / 1e6)}  # 1 MB: 0.05 s of coding

    def pick(wait):
        view = dict(_view(1.0, 1e6, costs), waits=[(1e6, 1.0, wait)])  # 1 MB per step at 1 MB/s: 1 s on the wire
        decision, report = auto.decide([{"measured": {"pipefusion": view}}], names)
        return decision["pipefusion"], report["pipefusion"]["candidates"]

    assert pick(0.0) == ("none", {"none": 0.0, "residual-int4": 50.0})  # hidden: coding only costs
    assert pick(1.0) == ("residual-int4", {"none": 1000.0, "residual-int4": 300.0})  # waited on at once
    assert pick(0.3) == ("residual-int4", {"none": 300.0, "residual-int4": 50.0})  # the saving covers the wait
    assert pick(0.055)[0] == "none"  # 55 ms of wait against 50 ms of coding: a saving under the margin
    # exchanges of two sizes, each with its own wait
    view = dict(_view(1.0, 2e6, costs), waits=[(5e5, 2.0, 0.5), (1e6, 1.0, 0.0)])
    assert auto.exposed_seconds(view, "none") == pytest.approx(1.0)
    assert auto.exposed_seconds(view, "residual-int4") == pytest.approx(2 * (0.125 + 0.025) + 0.05)


def test_the_trial_ranks_coded_candidates_by_their_whole_transfers():
    """A transfer that hid behind compute ties the coded candidates in the per-exchange model, so
    their codec timings alone (noise, here int4 a hair cheaper than int2) would pick the one to
    try; counted whole, a slow link tries the smallest payload and a fast one the cheapest codec."""
    names = ("none", "residual-int8", "residual-int4", "residual-int2")
    costs = {"none": (1.0, 0.0), "residual-int8": (0.25, 1.5e-9), "residual-int4": (0.13, 1.0e-9),
             "residual-int2": (0.07, 1.1e-9)}

    def best(mbps, whole):
        view = dict(_view(mbps, 1e6, costs), waits=[(1e6, 1.0, 0.0)])  # 1 MB per step, hidden
        return auto._best_coded(auto.expected_ms([{"measured": {"patch": view}}], "patch", names, whole=whole))

    assert best(1.0, whole=False) == "residual-int4"  # the model alone: codec costs only
    assert best(1.0, whole=True) == "residual-int2"  # 1 MB/s: bytes dominate
    assert best(1e6, whole=True) == "residual-int4"  # 1 TB/s: the cheapest codec


def test_one_process_measures_in_the_warmup_then_codes_with_the_floor(monkeypatch):
    monkeypatch.setenv(auto.FAKE_RATE_ENV, SLOW)
    state = ResidualState(CompressionConfig.parse("auto", auto_floor="residual-int4"))
    state.begin_request()
    key, shape = ("ulysses", 0, "q"), (8, 16)
    assert state.message_kind(key, shape, torch.float32) is MessageKind.SEED  # warm-up: raw, measured
    start = state.auto_clock()
    assert start is not None
    state.auto_observe("ulysses", 4096, start, torch.randn(32, 16))
    state.set_step(1)  # first coded step: decided (one rank: no collective)
    assert state.auto.decision == {"ulysses": "residual-int4"}
    assert state.choice(key)[0] == "residual" and state.choice(key)[1].name == "int4"
    assert state.auto_clock() is None  # nothing measured once decided
    assert state.stats()["auto"]["ulysses"]["codec"] == "residual-int4"
    assert format_auto(state.stats()["auto"])[0].startswith("auto ulysses: link 0.0 MB/s -> residual-int4")
    # unmeasured paths stay raw
    assert state.message_kind(("ring", 0, "k"), shape, torch.float32) is MessageKind.RAW


def test_the_decision_holds_until_the_shape_changes_or_every_n_requests(monkeypatch):
    monkeypatch.setenv(auto.FAKE_RATE_ENV, SLOW)

    def request(state, shape):
        state.begin_request(shape)
        state.set_step(0)
        if state.auto.pending:
            state.auto_observe("ulysses", 1024, state.auto_clock(), torch.randn(4, 8))
        state.set_step(1)

    state = ResidualState(CompressionConfig.parse("auto"))
    for _ in range(3):
        request(state, (64, 64, 4))
    assert state.auto.decisions == 1
    request(state, (128, 64, 4))  # a new request shape: measured again
    assert state.auto.decisions == 2
    every = ResidualState(CompressionConfig.parse("auto", auto_every=2))
    for _ in range(5):
        request(every, None)
        every.begin_request()  # the pipeline's own begin, nested in the request: not counted
    assert every.auto.decisions == 3  # requests 1, 3, 5


def test_between_requests_a_raw_request_measures_and_the_next_start_agrees(monkeypatch):
    """The PipeFusion / step-parallel flow in one process (no collective): nothing is agreed inside
    a request, every message of the measured request is raw, the next request's start agrees."""
    monkeypatch.setenv(auto.FAKE_RATE_ENV, SLOW)
    state = ResidualState(CompressionConfig.parse("auto"))
    state.auto_between_requests()
    key, shape, size = ("pipefusion", "latent", 0), (8, 16), (64, 64, 4)

    def request(shape_of_request, measure=True):
        state.begin_request(shape_of_request)  # the request loop's begin
        state.begin_request()  # the pipeline's own, nested: never agrees (no step since the last begin)
        kinds = []
        for step in range(3):
            state.set_step(step)
            kinds.append(state.message_kind(key, shape, torch.float32))
            start = state.auto_clock()
            if measure and start is not None:
                state.auto_observe("pipefusion", 512, start, torch.randn(8, 16), link=(0, 1))
        return kinds

    assert request(size) == [MessageKind.RAW] * 3 and state.auto.pending  # past the warm-up too
    assert request(size) == [MessageKind.SEED, MessageKind.CODED, MessageKind.CODED]  # agreed at its start
    assert state.auto.decision == {"pipefusion": "residual-int2"} and state.auto.decisions == 1
    assert state.auto_clock() is None
    # a new shape: that request measures (raw), the next agrees again
    assert request((32, 32, 4)) == [MessageKind.RAW] * 3 and state.auto.pending
    state.begin_request((64, 64, 4))  # and another shape before any agreement: measured for nothing
    assert state.auto.pending
    assert request((64, 64, 4)) == [MessageKind.RAW] * 3
    assert request((64, 64, 4))[-1] is MessageKind.CODED and state.auto.decisions == 2


@pytest.mark.parametrize("trial_step_s, kept", [(0.5, True), (0.99, False)])
def test_between_requests_the_pick_is_tried_on_one_request_and_kept_only_if_faster(monkeypatch, trial_step_s, kept):
    """Between requests (no faked link) the model's best coded candidate runs the next request; it
    holds only if that request's steps after the warm-up took TRIAL_MARGIN less than the raw
    request's, else the path goes raw. A model can miss a pipeline's queueing or a wait absorbed
    elsewhere; the trial measures the request itself."""
    monkeypatch.delenv(auto.FAKE_RATE_ENV, raising=False)
    now = [0.0]
    monkeypatch.setattr(auto, "clock", lambda: now[0])
    state = ResidualState(CompressionConfig.parse("auto"))
    state.auto_between_requests()
    key, shape = ("pipefusion", "latent", 0), (64, 64)

    def request(step_s):
        state.begin_request((64, 64, 4))
        kinds = []
        for step in range(4):
            now[0] += step_s
            state.set_step(step)
            kinds.append(state.message_kind(key, shape, torch.float32))
            start = state.auto_clock()
            if start is not None:
                state.auto_observe("pipefusion", 4096, start, torch.randn(shape), link=(0, 1))
        return kinds

    assert request(1.0) == [MessageKind.RAW] * 4  # measured: steps 1..3 span 2 s
    tried = request(trial_step_s)  # agreed at its start: the best coded candidate, on trial
    assert tried[1:] == [MessageKind.CODED] * 3 and state.auto.trial is not None
    codec = state.auto.decision["pipefusion"]
    assert codec != "none"
    settled = request(1.0)  # its start settles the trial: 3 * trial_step_s against 2 s
    report = state.auto.stats()["pipefusion"]
    assert report["trial"] == {"codec": codec, "raw_s": 2.0, "coded_s": 2 * trial_step_s, "kept": kept}
    assert state.auto.trial is None and state.auto.decisions == 1
    if kept:
        assert state.auto.decision == {"pipefusion": codec} and settled[1:] == [MessageKind.CODED] * 3
    else:
        assert state.auto.decision == {"pipefusion": "none"} and settled == [MessageKind.RAW] * 4
    assert report["codec"] == state.auto.decision["pipefusion"]


@pytest.mark.parametrize("trial_step_s, kept", [(0.5, True), (0.99, False)])
def test_a_lock_step_near_tie_goes_raw_then_tries_the_codec_on_the_next_request(monkeypatch, trial_step_s, kept):
    """The model puts int4 within the margin of none (under it on ulysses, over it on patch):
    `none` holds for the rest of the request, whose steps after the agreement are the raw side of
    a trial; the next request codes int4, and the one after keeps it only if that request was
    TRIAL_MARGIN faster. Paths the model decided outright (ring coded, sp raw) are not tried."""
    monkeypatch.delenv(auto.FAKE_RATE_ENV, raising=False)
    now = [0.0]
    monkeypatch.setattr(auto, "clock", lambda: now[0])
    report = {"ulysses": {"link_MBps": 10.0, "codec": "none", "expected_ms": 10.0,
                          "candidates": {"none": 10.0, "residual-int8": 9.8, "residual-int4": 9.5}},
              "patch": {"link_MBps": 10.0, "codec": "none", "expected_ms": 10.0,
                        "candidates": {"none": 10.0, "residual-int8": 12.0, "residual-int4": 10.8}},
              "ring": {"link_MBps": 1.0, "codec": "residual-int8", "expected_ms": 5.0,
                       "candidates": {"none": 10.0, "residual-int8": 5.0, "residual-int4": 5.5}},
              "sp": {"link_MBps": 1e4, "codec": "none", "expected_ms": 1.0,
                     "candidates": {"none": 1.0, "residual-int8": 1.2, "residual-int4": 1.15}}}
    decision = {"ulysses": "none", "patch": "none", "ring": "residual-int8", "sp": "none"}
    monkeypatch.setattr(auto, "decide", lambda gathered, names: (dict(decision), {p: dict(r) for p, r in report.items()}))
    state = ResidualState(CompressionConfig.parse("auto", auto_floor="residual-int4"))
    keys = {"ulysses": ("ulysses", 0, "q"), "patch": ("patch", 0, "kv"), "ring": ("ring", 0, "kv")}
    shape = (8, 16)

    def request(step_s):
        state.begin_request((64, 64, 4))
        kinds = {path: [] for path in keys}
        for step in range(4):
            now[0] += step_s
            state.set_step(step)
            for path, key in keys.items():
                kinds[path].append(state.message_kind(key, shape, torch.float32))
                start = state.auto_clock()
                if start is not None:
                    state.auto_observe(path, 4096, start, torch.randn(shape))
        return kinds

    first = request(1.0)  # agreed at step 1; ulysses raw from there on, steps 1..3 span 2 s
    assert first["ulysses"][1:] == [MessageKind.RAW] * 3 and first["ring"][1:] == [MessageKind.CODED] * 3
    assert state.auto.trial == {"paths": {"ulysses": "residual-int4", "patch": "residual-int4"}, "raw_s": None}
    tried = request(trial_step_s)  # its begin starts the trial
    assert tried["ulysses"][1:] == [MessageKind.CODED] * 3 and state.auto.trial["raw_s"] == 2.0
    assert state.auto.stats()["ulysses"]["trial"]["kept"] is None
    settled = request(1.0)
    stats = state.auto.stats()
    assert stats["ulysses"]["trial"] == {"codec": "residual-int4", "raw_s": 2.0, "coded_s": 2 * trial_step_s, "kept": kept}
    assert "trial" not in stats["ring"] and state.auto.decision["ring"] == "residual-int8"
    assert "trial" not in stats["sp"] and state.auto.decision["sp"] == "none"
    for path in ("ulysses", "patch"):
        assert state.auto.decision[path] == ("residual-int4" if kept else "none") == stats[path]["codec"]
        assert settled[path][1:] == [MessageKind.CODED if kept else MessageKind.RAW] * 3
    assert state.auto.trial is None and state.auto.decisions == 1


# ----- several gloo ranks: the decision is agreed -------------------------------------------------

def _auto_rank(rank: int, world: int, floors: list[str]) -> dict:
    from compactfusion_xdit.core.session import CompressionSession

    session = CompressionSession(CompressionConfig.parse("auto", auto_floor=floors[rank]))
    comm = session.comm()
    torch.manual_seed(rank)
    base = torch.randn(world * 4, 32)
    outs = []
    try:
        session.begin_request()
        for step in range(3):
            session.set_step(step)
            x = base + 0.01 * step * torch.randn_like(base)
            y = comm.all_to_all(("ulysses", 0, "qkv"), x)
            kv = comm.all_gather(("patch", 0, "kv"), x)
            outs.append((y, kv))
    except RuntimeError as err:
        return {"error": str(err)}
    stats = session.stats()
    return {"decision": session.state.auto.decision, "report": stats["auto"], "paths": stats["paths"],
            "y_last": outs[-1][0], "kv_last": outs[-1][1], "x_last": x}


TARGET = f"{__file__}:_auto_rank"


def test_two_ranks_slow_ulysses_picks_the_floor_fast_patch_picks_none():
    results = run_ranks(TARGET, 2, {"floors": ["residual-int2"] * 2},
                        timeout=60, env={auto.FAKE_RATE_ENV: f"ulysses={SLOW},patch={FAST}"})
    assert results[0]["decision"] == results[1]["decision"] == {"ulysses": "residual-int2", "patch": "none"}
    assert results[0]["report"] == results[1]["report"]
    for r in results:
        ulysses, patch = r["paths"]["ulysses"], r["paths"]["patch"]
        assert ulysses["coded_messages"] == 2 and ulysses["sent_bytes"] < ulysses["raw_bytes"]  # steps 1, 2 coded
        assert patch["coded_messages"] == 0 and patch["sent_bytes"] == patch["raw_bytes"]
    # patch sent raw: exact; ulysses coded: close to the senders' tensors
    for me, r in enumerate(results):
        for origin, other in enumerate(results):
            assert torch.equal(r["kv_last"][origin], other["x_last"])
            chunk = other["x_last"][me * 4:(me + 1) * 4]
            assert (r["y_last"][origin * 4:(origin + 1) * 4] - chunk).abs().max() < 0.5


@pytest.mark.slow  # the 2-rank test covers the agreement; this one adds a third rank (CI time)
def test_three_ranks_on_a_fast_link_all_pick_none():
    results = run_ranks(TARGET, 3, {"floors": ["residual-1bit"] * 3},
                        timeout=60, env={auto.FAKE_RATE_ENV: FAST})
    for r in results:
        assert r["decision"] == {"ulysses": "none", "patch": "none"}
        assert all(p["coded_messages"] == 0 for p in r["paths"].values())


def test_a_rank_that_would_disagree_fails_with_one_clear_line():
    results = run_ranks(TARGET, 2, {"floors": ["residual-int2", "residual-1bit"]},
                        timeout=60, env={auto.FAKE_RATE_ENV: SLOW})
    for r in results:
        assert "\n" not in r["error"]
        assert r["error"].startswith("compression auto: rank 1 has auto floor 'residual-1bit' but rank 0 has "
                                     "'residual-int2'"), r["error"]


def _skewed_rank(rank: int, world: int, skew_s: float) -> dict:
    """Rank 1 reaches every warm-up exchange `skew_s` after rank 0 (a slower compute)."""
    import time

    from compactfusion_xdit.core.session import CompressionSession

    session = CompressionSession(CompressionConfig.parse("auto"))
    comm = session.comm()
    x = torch.randn(world * 64, 128)  # 32 KB per peer
    session.begin_request()
    for step in range(2):
        session.set_step(step)
        for layer in range(4):
            if step == 0 and rank == 1:
                time.sleep(skew_s)
            comm.all_to_all(("ulysses", layer, "qkv"), x)
    return session.stats()["auto"]


def test_a_peer_computing_slower_does_not_pass_for_a_slow_link():
    """Real loopback, no fake rate: rank 0 waits 50 ms for its peer at each warm-up exchange, which
    timed as transfer would make 32 KB look like 0.7 MB/s; the barrier-aligned probe times the link."""
    skew = 0.05
    reports = run_ranks(f"{__file__}:_skewed_rank", 2, {"skew_s": skew}, timeout=120)
    assert reports[0] == reports[1]
    assert reports[0]["ulysses"]["link_MBps"] > 10 * (32768 / skew / 1e6), reports[0]
