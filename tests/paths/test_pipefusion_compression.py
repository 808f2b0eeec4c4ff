"""Compressed PipeFusion (``patches/pipefusion.py``) on real xfuser 0.7.0 over gloo.

tiny-flux (2 double + 2 single blocks, 4 heads of 16), PipeFusion degree 2 with 2 patches,
1 synchronous warm-up step then 5 patch-phase steps, fp32, seed 42, 64x64 and 48x80. Every request
runs on one loaded pipeline in one pair of processes (`runs_in_turn`: the xfuser import dominates).
The reference of each compressed run is the uncompressed PipeFusion run (stock xfuser, no
compression patch), compared by the PSNR of the final latents (peak = the reference's value range): a correctness bound on
tiny-flux, and residual against plain int4 on the trained digits-flux (20 steps), whose sharp
attention lets the codecs differ.
``--compression auto`` runs in the same launch: two requests on one session each, the link faked
slow and fast (``CFX_AUTO_LINK_MBPS``); the first request is raw, the second uses what the stages
agreed when it started.
A second launch drives xfuser's ``PipelineGroupCoordinator`` directly (no model) through every
entry point, skip tensors included, and through the raw fallbacks.

Per channel ("latent" per patch, "encoder_hidden_states") the patch phase sends one message per
step: message 0 raw (seeds the caches, compression warm-up 1), messages 1.. coded. The synchronous
step's whole maps go raw through xfuser's own path.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from compactfusion_xdit.benchmarks.metrics import range_psnr as psnr
from compactfusion_xdit.models import digits
from compactfusion_xdit.testing import run_ranks

HERE = os.path.abspath(__file__)
STEPS = 6
WARMUP_STEPS = 1               # xfuser's synchronous steps
PATCHES = 2
TIMEOUT = 150.0
FLAGS = ["--pipefusion_parallel_degree", "2", "--num_pipeline_patch", str(PATCHES), "--warmup_steps", str(WARMUP_STEPS)]
RAW_PATCHED = "raw-through-patch"  # the compression patch applied with a `none` session: raw payloads
SLOW_LINK, FAST_LINK = "0.001", "1e9"  # MB/s, for `auto@RATE` variants (CFX_AUTO_LINK_MBPS)
REAL_LINK = "real"  # `auto@real`: the link is not faked (auto tries its pick on a request)
SERVED_IN_TURN = "compactfusion_xdit.testing.targets:worker_served_in_turn"


def argv_for(model: str, size: tuple[int, int], steps: int = STEPS, prompt: str = "a cat") -> list[str]:
    return ["--model", model, "--height", str(size[0]), "--width", str(size[1]), "--num_inference_steps", str(steps),
            "--prompt", prompt, "--max_sequence_length", "16", "--seed", "42", "--output_type", "latent",
            "--compression", "none", *FLAGS]


def runs_in_turn(rank: int, world_size: int, model: str, variants: list[tuple[str, tuple[int, int]]],
                 steps: int = STEPS, prompt: str = "a cat"):
    """Rank target: one loaded pipeline, one request per (compression, (height, width)). Before
    each request the patches are installed for that compression (``RAW_PATCHED``: stock install
    plus this module's patch with a ``none`` session; ``auto@RATE``: auto with the cache check on
    and the link faked at RATE MB/s, or measured for ``auto@real``; a variant repeating the one
    before runs on the same session).
    Returns per request the last rank's latents and every rank's PipeFusion byte counts, message
    log and cache check (with auto: every message's, and the decision)."""
    from compactfusion_xdit import envs, patches
    from compactfusion_xdit.rank import worker
    from compactfusion_xdit.core.config import CompressionConfig
    from compactfusion_xdit.patches import pipefusion
    from compactfusion_xdit.patches._attrs import AttributePatcher
    from compactfusion_xdit.core.session import CompressionSession

    args = worker.parse_args(argv_for(model, variants[0][1], steps, prompt))
    loaded = worker.load_pipeline(args)
    results = []
    previous = None
    for compression, (height, width) in variants:
        extra = AttributePatcher()
        name, _, rate = compression.partition("@")
        if compression != previous:
            patches.uninstall()
        previous = compression
        if compression == RAW_PATCHED:
            patches.install(CompressionConfig.parse("none"))
            session = CompressionSession("none")
            pipefusion.apply(extra, session)
        else:
            os.environ[envs.AUTO_LINK_MBPS] = "" if rate == REAL_LINK else rate
            patches.install(CompressionConfig.parse(name, check=bool(rate)))
            session = patches.session()
        try:
            out = worker.call_pipeline(loaded, args, height=height, width=width)
        finally:
            extra.restore()
        result = {"latents": out.images.float() if rank == world_size - 1 else None}
        if session is not None:
            checked = session.lifecycle.check_caches() if rate else session.check_caches(None)
            result.update(stats=session.stats()["paths"].get("pipefusion"), messages=list(session.pipefusion.messages),
                          mismatches=checked,
                          caches=sorted(side + repr(key[1:]) for side, key in session.state.cache_digests()))
            if rate:
                result.update(decision=session.state.auto.decision, report=session.stats()["auto"],
                              decisions=session.state.auto.decisions, trial=session.state.auto.trial)
        results.append(result)
    return results


def run_variants(model: str, variants: list[tuple[str, tuple[int, int]]], **request) -> list[list[dict]]:
    """Per variant, the list of both ranks' results. `request`: steps, prompt."""
    per_rank = run_ranks(f"{HERE}:runs_in_turn", 2, {"model": model, "variants": variants, **request},
                         timeout=TIMEOUT, init_process_group=False)
    return [[r[i] for r in per_rank] for i in range(len(variants))]


# --------------------------------------------------------------------------------------------
# What tiny-flux puts on the wire (2 stages: stage 0 = 2 double blocks, stage 1 = 2 single blocks)
# --------------------------------------------------------------------------------------------

INNER = 64                     # 4 heads of 16: stage 0 hands hidden states of this width to stage 1
LATENT_CHANNELS = 16           # Flux's packed latents (4 VAE channels x 2x2), stage 1 -> stage 0
TEXT_TOKENS = 16               # --max_sequence_length
ASYNC_STEPS = STEPS - WARMUP_STEPS


def tokens(size: tuple[int, int]) -> int:
    """tiny VAE downsamples 2x, Flux packs 2x2 latent pixels per token."""
    return (size[0] // 4) * (size[1] // 4)


def expected_sends(rank: int, size: tuple[int, int], warmup_kind: str) -> list[tuple]:
    """(key, shape, kind) of every message `rank` sends, in order. Synchronous steps: whole maps
    through xfuser's own path ("raw"). Patch phase: one message per channel and step, the first
    (compression warm-up 1) `warmup_kind` ("seed" in residual mode, "raw" in plain mode), then coded."""
    t = tokens(size)
    sends = []
    if rank == 0:
        for _ in range(WARMUP_STEPS):
            sends += [(("pipefusion", "latent", -1), (1, t, INNER), "raw"),
                      (("pipefusion", "encoder_hidden_state", -1), (1, TEXT_TOKENS, INNER), "raw")]
        for step in range(ASYNC_STEPS):
            kind = warmup_kind if step == 0 else "coded"
            sends.append((("pipefusion", "encoder_hidden_states", 0), (1, TEXT_TOKENS, INNER), kind))
            sends += [(("pipefusion", "latent", p), (1, t // PATCHES, INNER), kind) for p in range(PATCHES)]
    else:
        sends += [(("pipefusion", "latent", -1), (1, t, LATENT_CHANNELS), "raw")] * WARMUP_STEPS
        for step in range(ASYNC_STEPS - 1):  # the last step's latents stay on the last stage
            kind = warmup_kind if step == 0 else "coded"
            sends += [(("pipefusion", "latent", p), (1, t // PATCHES, LATENT_CHANNELS), kind) for p in range(PATCHES)]
    return sends


def int4_wire_nbytes(shape) -> int:
    """docs/codec_format.md: N rows of ceil(C/2) bytes + N bf16 scales."""
    n, c = math.prod(shape[:-1]), shape[-1]
    return n * math.ceil(c / 2) + 2 * n


def sent_nbytes(sends: list[tuple]) -> int:
    return sum(int4_wire_nbytes(shape) if kind == "coded" else 4 * math.prod(shape) for _, shape, kind in sends)


# --------------------------------------------------------------------------------------------
# Runs (one launch: 2 ranks, 6 requests on one loaded pipeline)
# --------------------------------------------------------------------------------------------

SQUARE, WIDE = (64, 64), (48, 80)
AUTO_SLOW, AUTO_FAST, AUTO_REAL = f"auto@{SLOW_LINK}", f"auto@{FAST_LINK}", f"auto@{REAL_LINK}"
VARIANTS = [("none", SQUARE), (RAW_PATCHED, SQUARE), ("residual-int4", SQUARE), ("int4", SQUARE),
            ("none", WIDE), ("residual-int4", WIDE),
            # auto: two requests on one session each (the first measures, raw; the second decided)
            (AUTO_SLOW, SQUARE), (AUTO_SLOW, SQUARE), ("residual-int2", SQUARE), (AUTO_FAST, SQUARE), (AUTO_FAST, SQUARE),
            # a measured link: raw, the pick on trial, then settled
            (AUTO_REAL, SQUARE), (AUTO_REAL, SQUARE), (AUTO_REAL, SQUARE)]


@pytest.fixture(scope="module")
def flux():
    from compactfusion_xdit.models import tiny

    assert "tiny-flux" in tiny.BUILTIN_MODELS
    return "tiny-flux"


@pytest.fixture(scope="module")
def runs(flux) -> dict:
    """Variant -> both ranks' results; a variant run twice maps to the list of its requests' results."""
    results = run_variants(flux, VARIANTS)
    out: dict = {}
    for variant, result in zip(VARIANTS, results):
        if variant[0].startswith("auto@"):
            out.setdefault(variant, []).append(result)
        else:
            out[variant] = result
    return out


def last_latents(runs, compression, size=SQUARE) -> torch.Tensor:
    return runs[(compression, size)][-1]["latents"]


def test_raw_payloads_through_the_patch_are_bitwise_stock(runs):
    assert torch.equal(last_latents(runs, RAW_PATCHED), last_latents(runs, "none"))


def test_raw_payloads_count_every_pipefusion_byte_as_sent(runs):
    for rank, r in enumerate(runs[(RAW_PATCHED, SQUARE)]):
        sends = expected_sends(rank, SQUARE, "raw")
        sends = [(key, shape, "raw") for key, shape, _ in sends]
        assert r["stats"]["raw_bytes"] == r["stats"]["sent_bytes"] == sent_nbytes(sends)
        assert r["stats"]["coded_messages"] == 0 and r["stats"]["messages"] == len(sends)


def test_residual_int4_stays_close_to_uncompressed_pipefusion(runs):
    # A correctness bound on the random tiny-flux (measured 70.0 dB at 64x64, 70.8 dB at 48x80,
    # 6 steps, scripts/bench_fidelity.py --path pipefusion); fidelity is tested on digits-flux below.
    for size in (SQUARE, WIDE):
        assert psnr(last_latents(runs, "none", size), last_latents(runs, "residual-int4", size)) > 60.0


# --compression auto: measured in the first request (raw), agreed when the second starts


@pytest.mark.parametrize("variant, chosen", [(AUTO_SLOW, "residual-int2"), (AUTO_FAST, "none")])
def test_auto_agrees_between_requests_and_codes_like_the_codec_it_chose(runs, variant, chosen):
    first, second = runs[(variant, SQUARE)]
    assert [(r["decision"], r["decisions"]) for r in first] == [(None, 0)] * 2  # nothing agreed inside a request
    assert [(r["decision"], r["decisions"]) for r in second] == [({"pipefusion": chosen}, 1)] * 2  # every stage alike
    assert second[0]["report"] == second[1]["report"]
    assert all(r["mismatches"] == [] for r in first + second)  # caches and every message's checksum
    # the first request measured: every patch-phase message raw, the latents bitwise stock
    assert {kind for r in first for *_, kind in r["messages"]} == {"raw"}
    assert torch.equal(first[-1]["latents"], last_latents(runs, "none"))
    # the second codes exactly as the fixed codec it chose: same messages, same latents
    fixed = runs[(chosen, SQUARE)] if chosen != "none" else runs[(RAW_PATCHED, SQUARE)]
    for auto_rank, fixed_rank in zip(second, fixed):
        assert auto_rank["messages"] == fixed_rank["messages"]
    assert torch.equal(second[-1]["latents"], fixed[-1]["latents"])


def test_on_a_measured_link_auto_tries_its_pick_on_one_request_then_every_stage_settles_alike(runs):
    """No faked link: the first request measures (raw), the second runs the model's best coded
    candidate on trial, the third's start settles it from both stages' timings: kept, or every
    message raw again. Both stages hold the same decision and report; caches stay consistent."""
    first, trial, settled = runs[(AUTO_REAL, SQUARE)]
    assert [(r["decision"], r["trial"]) for r in first] == [(None, None)] * 2
    assert {kind for r in first for *_, kind in r["messages"]} == {"raw"}
    tried = trial[0]["decision"]["pipefusion"]
    assert tried != "none" and all(r["decision"] == {"pipefusion": tried} and r["trial"] for r in trial)
    assert {kind for r in trial for *_, kind in r["messages"]} >= {"coded"}
    report = settled[0]["report"]["pipefusion"]
    assert all(r["report"] == settled[0]["report"] and r["trial"] is None for r in settled)  # every stage alike
    assert report["trial"]["codec"] == tried and report["trial"]["raw_s"] > 0 and report["trial"]["coded_s"] > 0
    final = tried if report["trial"]["kept"] else "none"
    assert all(r["decision"] == {"pipefusion": final} and r["decisions"] == 1 for r in settled)
    assert {kind for r in settled for *_, kind in r["messages"]} <= ({"raw", "seed", "coded"} if report["trial"]["kept"] else {"raw"})
    assert all(r["mismatches"] == [] for r in first + trial + settled)


@pytest.mark.slow  # 4 processes, three launches through the worker (25-35 s here)
def test_four_stages_agree_between_served_requests_through_the_worker(flux):
    """``xfuser``'s rank code, PipeFusion degree 4, two requests per launch: auto on a slow link
    (the first request raw = stock; every stage decides the floor when the second starts; the
    second = the fixed floor's), cache check on every message."""
    from compactfusion_xdit.cli.ports import free_port

    size = 64
    base = ["--model", flux, "--height", str(size), "--width", str(size), "--num_inference_steps", "5",
            "--prompt", "a cat", "--prompt", "a cat", "--max_sequence_length", "16", "--seed", "42",
            "--output_type", "latent", "--pipefusion_parallel_degree", "4", "--num_pipeline_patch", "4",
            "--warmup_steps", "1", "--compression-check"]
    runs = [(base + ["--compression", "auto"], SLOW_LINK), (base + ["--compression", "residual-int2"], ""),
            (base + ["--compression", "none"], "")]
    per_rank = run_ranks(SERVED_IN_TURN, 4, {"runs": runs, "ports": [free_port() for _ in runs]},
                         timeout=600, init_process_group=False)
    (auto_run, fixed, stock) = per_rank[-1]
    assert [r[0]["decision"] for r in per_rank] == [{"pipefusion": "residual-int2"}] * 4
    first, second = auto_run["stats"]
    assert "auto" not in first or not first["auto"]  # nothing agreed during the first request
    assert second["auto"]["pipefusion"]["codec"] == "residual-int2"
    assert first["sent_bytes"] == first["raw_bytes"] and second["sent_bytes"] < second["raw_bytes"]
    assert all(s["cache_consistent"] is not False for s in auto_run["stats"] + fixed["stats"])
    assert second["cache_consistent"] is True
    assert torch.equal(auto_run["latents"][0], stock["latents"][0])
    assert torch.equal(auto_run["latents"][1], fixed["latents"][1])
    assert torch.equal(fixed["latents"][0], fixed["latents"][1])  # caches start empty per request


# Fidelity on the trained digits-flux: "digit 3", seed 42, 16x16, 20 steps (1 synchronous), 2 patches.
# Measured on the shipped weights: residual-int4 53.1 dB, plain int4 35.0 dB (docs/digits_flux.md);
# asserted with margin.
DIGITS_STEPS = 20
DIGITS_RESIDUAL_INT4_MIN_DB = 48.0
DIGITS_PLAIN_GAP_DB = 13.0


@pytest.fixture(scope="module")
def digits_runs() -> dict:
    size = (digits.SIZE, digits.SIZE)
    names = ["none", "residual-int4", "int4"]
    results = run_variants(digits.NAME, [(n, size) for n in names], steps=DIGITS_STEPS, prompt=digits.prompt(3))
    assert all(rank["mismatches"] == [] for rank in results[1])  # residual-int4's caches
    return {n: r[-1]["latents"] for n, r in zip(names, results)}


def test_residual_int4_close_plain_int4_worse_on_the_trained_model(digits_runs):
    ref = digits_runs["none"]
    resid, plain = psnr(ref, digits_runs["residual-int4"]), psnr(ref, digits_runs["int4"])
    assert resid >= DIGITS_RESIDUAL_INT4_MIN_DB, (resid, plain)
    assert resid - plain >= DIGITS_PLAIN_GAP_DB, (resid, plain)


@pytest.mark.parametrize("compression,size,warmup_kind", [("residual-int4", SQUARE, "seed"), ("int4", SQUARE, "raw"),
                                                           ("residual-int4", WIDE, "seed")])
def test_messages_and_bytes_are_the_payload_arithmetic(runs, compression, size, warmup_kind):
    for rank, r in enumerate(runs[(compression, size)]):
        sends = expected_sends(rank, size, warmup_kind)
        logged = [(key, shape, kind) for role, key, shape, dtype, kind in r["messages"] if role == "send"]
        assert logged == sends
        assert all(dtype == torch.float32 for *_, dtype, _ in r["messages"])
        s = r["stats"]
        assert s["raw_bytes"] == 4 * sum(math.prod(shape) for _, shape, _ in sends)
        assert s["sent_bytes"] == sent_nbytes(sends)
        assert s["coded_messages"] == sum(kind == "coded" for *_, kind in sends)
        assert s["reseeds"] == s["nonfinite_rows"] == 0


def test_receivers_expect_what_senders_send(runs):
    """Each coded-channel message is received with the sender's key, shape and kind (the raw
    synchronous messages go through xfuser's receive path and are not logged)."""
    for variant in [("residual-int4", SQUARE), ("int4", SQUARE), ("residual-int4", WIDE)]:
        ranks = runs[variant]
        for sender, receiver in ((0, 1), (1, 0)):
            sent = [m[1:] for m in ranks[sender]["messages"] if m[0] == "send" and m[1][2] >= 0]
            received = [m[1:] for m in ranks[receiver]["messages"] if m[0] == "recv"]
            assert received == sent


def test_caches_are_consistent_across_stages(runs):
    for variant in [("residual-int4", SQUARE), ("int4", SQUARE), ("residual-int4", WIDE)]:
        for r in runs[variant]:
            assert r["mismatches"] == []


def test_one_residual_cache_per_channel_and_link(runs):
    """Stage 0 -> 1: text states and each patch's hidden states; stage 1 -> 0: each patch's latents.
    Plain int4 keeps no cache."""
    forward = ["('encoder_hidden_states', 0, 0, 1)"] + [f"('latent', {p}, 0, 1)" for p in range(PATCHES)]
    backward = [f"('latent', {p}, 1, 0)" for p in range(PATCHES)]
    r0, r1 = runs[("residual-int4", SQUARE)]
    assert r0["caches"] == sorted(["send" + k for k in forward] + ["recv" + k for k in backward])
    assert r1["caches"] == sorted(["recv" + k for k in forward] + ["send" + k for k in backward])
    assert all(r["caches"] == [] for r in runs[("int4", SQUARE)])


# --------------------------------------------------------------------------------------------
# Coordinator level: every entry point, skip tensors, raw fallbacks (no model)
# --------------------------------------------------------------------------------------------

COORD_STEPS = 4
SKIP_SHAPE = (2, 1, 6, 8)      # HunyuanDiT-like: (blocks, batch, patch tokens, width)


def smooth(seed: int, step: int, shape) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    return math.cos(0.2 * step) * a + math.sin(0.2 * step) * b


def coordinator_cases(rank: int, world_size: int, cases: dict) -> dict:
    """Rank target: `coordinator_exchange` for each case, in one process (the import dominates)."""
    return {name: coordinator_exchange(rank, world_size, *case) for name, case in cases.items()}


def coordinator_exchange(rank: int, world_size: int, compression: str, warmup: int, nan_at: tuple | None):
    """Rank target: xfuser's PipelineGroupCoordinator over gloo with this module's patch applied.
    Stage 0 sends, per step, two latent patches (isend), two skip tensors (isend_skip) and the text
    states (blocking send); stage 1 receives them through recv_next / recv_skip_next / blocking
    recv. Returns stage 1's relative errors, both ranks' stats and the cache check."""
    from compactfusion_xdit.patches import cpu_gloo

    cpu_gloo.make_xfuser_importable()
    from xfuser.core.distributed.group_coordinator import PipelineGroupCoordinator

    from compactfusion_xdit.patches import _attrs, pipefusion, pipefusion_gloo
    from compactfusion_xdit.core.session import CompressionSession

    patcher = _attrs.AttributePatcher()
    pipefusion_gloo.apply(patcher)
    session = CompressionSession(compression_config(compression, warmup))
    pipefusion.apply(patcher, session)
    current = [0]
    patcher.replace(pipefusion, "_current_skip_segment", lambda: current[0])
    pp = PipelineGroupCoordinator([[0, 1]], local_rank=rank, torch_distributed_backend="gloo")
    pp.reset_buffer()
    pp.set_config(torch.float32)
    pp.set_skip_tensor_recv_buffer([list(SKIP_SHAPE)] * 2, [SKIP_SHAPE[0], 1, 12, SKIP_SHAPE[3]])
    session.begin_request()
    errors = []
    for step in range(COORD_STEPS):
        session.set_step(step)
        latents = [smooth(p, step, (1, 6, 8)) for p in range(2)]
        skips = [smooth(10 + p, step, SKIP_SHAPE) for p in range(2)]
        text = smooth(20, step, (1, 3, 8))
        if nan_at == (step, 1):
            latents[1][0, 0, 0] = float("nan")
        if rank == 0:
            handles = [pp.pipeline_isend(latents[p], segment_idx=p) for p in range(2)]
            for p in range(2):
                current[0] = p
                handles.append(pp.pipeline_isend_skip(skips[p]))
            pp.pipeline_send(text, name="encoder_hidden_states")
            for h in handles:
                h.wait()
        else:
            for p in range(2):
                pp.add_pipeline_recv_task(p)
                pp.add_pipeline_recv_skip_task(p)
            for p in range(2):
                pp.recv_next()
                pp.recv_skip_next()
            got_text = pp.pipeline_recv(0, "encoder_hidden_states").clone()
            got = [pp.get_pipeline_recv_data(idx=p).clone() for p in range(2)]
            got_skips = [pp.get_pipeline_recv_skip_data(idx=p).clone() for p in range(2)]
            for sent, rec in zip(latents + skips + [text], got + got_skips + [got_text]):
                if torch.isfinite(sent).all():
                    errors.append(float((rec - sent).norm() / sent.norm()))
                else:  # the rows that held NaN arrive wholly NaN (marked in band), the others finite
                    rows_nan, held_nan = rec.reshape(-1, 8).isnan(), ~sent.reshape(-1, 8).isfinite()
                    errors.append(torch.equal(rows_nan.all(1), held_nan.any(1)) and torch.equal(rows_nan.any(1), rows_nan.all(1)))
    result = {"errors": errors, "stats": session.stats()["paths"].get("pipefusion"),
              "mismatches": session.check_caches(None), "messages": list(session.pipefusion.messages)}
    patcher.restore()
    return result


def compression_config(name: str, warmup: int):
    from compactfusion_xdit.core.config import CompressionConfig

    return CompressionConfig.parse(name, warmup=warmup)


@pytest.fixture(scope="module")
def coordinator_runs() -> dict:
    cases = {"int4-warmup1": ("residual-int4", 1, None), "int4-warmup0-nan": ("residual-int4", 0, (2, 1))}
    per_rank = run_ranks(f"{HERE}:coordinator_cases", 2, {"cases": cases}, timeout=TIMEOUT)
    return {name: [r[name] for r in per_rank] for name in cases}


def test_every_entry_point_carries_coded_payloads(coordinator_runs):
    sender, receiver = coordinator_runs["int4-warmup1"]
    per_step = 5                                         # 2 latents, 2 skips, text
    assert receiver["errors"][:per_step] == [0.0] * per_step  # step 0: raw, seeds the caches
    assert 0 < max(receiver["errors"][per_step:]) < 0.05      # measured <= 0.02
    keys = {m[1] for m in sender["messages"]}
    assert keys == {("pipefusion", "latent", 0), ("pipefusion", "latent", 1), ("pipefusion", "skip", 0),
                    ("pipefusion", "skip", 1), ("pipefusion", "encoder_hidden_states", 0)}
    s = sender["stats"]
    raw_per_step = 4 * (2 * 6 * 8 + 2 * math.prod(SKIP_SHAPE) + 3 * 8)
    coded_per_step = 2 * int4_wire_nbytes((1, 6, 8)) + 2 * int4_wire_nbytes(SKIP_SHAPE) + int4_wire_nbytes((1, 3, 8))
    assert s["raw_bytes"] == COORD_STEPS * raw_per_step
    assert s["sent_bytes"] == raw_per_step + (COORD_STEPS - 1) * coded_per_step
    assert sender["mismatches"] == receiver["mismatches"] == []


def test_warmup0_and_nan_need_no_side_message(coordinator_runs):
    """warm-up 0: every channel's first message is a raw SEED both ends expect (no cache yet); a NaN
    in latent 1 at step 2 travels as a marked row inside the coded payload. Every send is exactly
    one message of the size both ends computed: the bytes equal the arithmetic, no tag-matched
    side message exists (the communicator has none to send), and the caches agree."""
    sender, receiver = coordinator_runs["int4-warmup0-nan"]
    errors = receiver["errors"]
    assert errors[:5] == [0.0] * 5                       # step 0: seeds (raw, exact)
    assert errors[2 * 5 + 1] is True                     # step 2, latent 1: its NaN row arrived NaN, the rest coded
    assert 0 < errors[3 * 5 + 1] < 0.05                  # step 3, latent 1: coded again, no re-seed needed
    s = sender["stats"]
    assert s["reseeds"] == 5 and s["nonfinite_rows"] == 1  # the five first messages; the one marked row
    sends = [(key, shape, kind) for role, key, shape, _, kind in sender["messages"] if role == "send"]
    assert [k for _, _, k in sends[:5]] == ["seed"] * 5 and {k for _, _, k in sends[5:]} == {"coded"}
    assert s["messages"] == len(sends) and s["sent_bytes"] == sent_nbytes(sends)
    assert sender["mismatches"] == receiver["mismatches"] == []
