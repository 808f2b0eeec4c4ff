"""ParaStep step parallelism (`compactfusion_xdit.modes.step_parallel`) on CPU ranks (gloo).

* A toy loop (``transformer(x, t) -> scheduler.step``, an explicit Euler scheduler) against a
  single-process replay of the ParaStep recurrence: bitwise equal, on 3 ranks (a final partial
  window) and on two step groups of 2 inside a 4-rank world.
* The built-in tiny Flux, SD3 and PixArt (both CFG batch 2, guidance 5; PixArt with DPM-Solver
  multistep) as plain diffusers pipelines, 64x64, 8 steps, fp32, seed 42: warm-up = steps gives the single-process latents bitwise; fewer warm-up
  steps stay within measured PSNR bounds; a second request gives the same latents (state reset per
  ``pipe()`` call); every rank ends with rank 0's latents.
* ``--compression residual-int4``: the ``step`` byte counts follow the payload arithmetic exactly,
  and the PSNR stays within a measured margin of the uncompressed twin.
* ``--compression auto`` (toy loop; slow: through the worker): the first request runs raw, the ranks
  agree when the next starts, and from then on the output equals the chosen codec's bitwise.

PSNR is against the single-process latents with peak = max - min of the reference.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from compactfusion_xdit.modes.step_parallel import StepParallel, check_settings, locate
from compactfusion_xdit.benchmarks.metrics import range_psnr as psnr
from compactfusion_xdit.testing import run_ranks

HERE = os.path.abspath(__file__)
WORKER_LATENTS = "compactfusion_xdit.testing.targets:worker_latents"
TIMEOUT = 480.0  # hard bound against hangs; generous because CI machines may be loaded
STEPS = 8
WARMUPS = (STEPS, 4, 2, 1)
# Measured (2 ranks, 64x64, 8 steps, seed 42), PSNR in dB for warm-up 4 / 2 / 1:
#   tiny-flux 80.3 / 76.1 / 74.2;  tiny-sd3 (CFG, guidance 5) 85.0 / 84.5 / 79.1.
#   tiny-pixart (CFG, guidance 5, DPM-Solver multistep; |latents| ~ 1e3): warm-up 2: 89.0.
MIN_PSNR = {"tiny-flux": {4: 77.0, 2: 73.0, 1: 71.0}, "tiny-sd3": {4: 82.0, 2: 81.0, 1: 76.0}, "tiny-pixart": {2: 86.0}}
# Measured residual-int4 (tiny-flux, warm-up 4 / 2 / 1): 76.4 / 71.7 / 70.6 dB, i.e. 3.6-4.5 dB below
# the uncompressed twin.
INT4_MARGIN_DB = 6.0


# --------------------------------------------------------------------------------------------
# The schedule and the settings
# --------------------------------------------------------------------------------------------


def test_schedule_has_warmup_then_windows_with_a_partial_last_one():
    rounds = [locate(i, warmup=2, degree=3, total=10) for i in range(10)]
    assert rounds[:2] == [None, None]
    assert [(r.window, r.start, r.round, r.length) for r in rounds[2:]] == [
        (0, 2, 0, 3), (0, 2, 1, 3), (0, 2, 2, 3), (1, 5, 0, 3), (1, 5, 1, 3), (1, 5, 2, 3), (2, 8, 0, 2), (2, 8, 1, 2)]
    assert [r.last for r in rounds[2:]] == [False, False, True, False, False, True, False, True]


@pytest.mark.parametrize("degree, warmup, fix", [(0, 1, "degree must be an integer >= 1"),
                                                  (2, 0, "--step_parallel_warmup must be at least 1"),
                                                  (2, -1, "--step_parallel_warmup must be an integer >= 0")])
def test_bad_settings_are_one_line_errors(degree, warmup, fix):
    with pytest.raises(ValueError, match=fix):
        check_settings(degree, warmup)


# --------------------------------------------------------------------------------------------
# Toy loop: exact recurrence
# --------------------------------------------------------------------------------------------


class ToyTransformer(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.weight = torch.nn.Parameter(torch.randn(8, 8, generator=g) / 3)

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor) -> tuple[torch.Tensor]:
        return (torch.tanh(hidden_states @ self.weight + timestep),)


class ToyScheduler:
    """Explicit Euler on sigmas 1 -> 0: x <- x + (sigma_{i+1} - sigma_i) * eps."""

    def set_timesteps(self, n: int) -> None:
        self.sigmas = torch.linspace(1.0, 0.0, n + 1)
        self.timesteps = self.sigmas[:-1] * 1000
        self.index = 0

    def step(self, model_output, timestep, sample, return_dict=False):
        out = sample + (self.sigmas[self.index + 1] - self.sigmas[self.index]) * model_output
        self.index += 1
        return (out,)


class ToyPipeline:
    def __init__(self) -> None:
        self.transformer = ToyTransformer()
        self.scheduler = ToyScheduler()

    @torch.no_grad()
    def __call__(self, steps: int) -> torch.Tensor:
        self.scheduler.set_timesteps(steps)
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
        for t in self.scheduler.timesteps:
            eps = self.transformer(x, t / 1000)[0]
            x = self.scheduler.step(eps, t, x)[0]
        return x


@torch.no_grad()
def parastep_replay(steps: int, warmup: int, degree: int) -> torch.Tensor:
    """The ParaStep recurrence in one process: rank r's trajectory in a window reuses its last
    prediction for r rounds, then evaluates; rank 0 advances with the prediction of each round."""
    pipe = ToyPipeline()
    pipe.scheduler.set_timesteps(steps)
    sigmas, ts = pipe.scheduler.sigmas, pipe.scheduler.timesteps
    model = lambda x, i: pipe.transformer(x, ts[i] / 1000)[0]
    euler = lambda eps, i, x: x + (sigmas[i + 1] - sigmas[i]) * eps
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    for i in range(min(warmup, steps)):
        eps = model(x, i)
        x = euler(eps, i, x)
    last = [eps] * degree
    start = warmup
    while start < steps:
        length = min(degree, steps - start)
        fresh = []
        for r in range(length):
            xr = x
            for j in range(r):
                xr = euler(last[r], start + j, xr)
            fresh.append(model(xr, start + r))
            last[r] = fresh[r]
        for r in range(length):
            x = euler(fresh[r], start + r, x)
        start += length
    return x


def toy_run(rank: int, world_size: int, steps: int, warmup: int, degree: int):
    import torch.distributed as dist

    group = None
    if degree != world_size:  # step groups {0, 2}, {1, 3}: the layout an outer parallel dimension gives
        groups = [dist.new_group(list(range(i, world_size, world_size // degree)))
                  for i in range(world_size // degree)]
        group = groups[rank % (world_size // degree)]
    pipe = ToyPipeline()
    mode = StepParallel(degree, warmup, group=group)
    mode.install(pipe)
    first, second = pipe(steps), pipe(steps)
    counts = dict(mode.counts)
    mode.uninstall()
    return first, second, counts, pipe(steps)


@pytest.mark.parametrize("world_size, degree, steps, warmup", [
    (3, 3, 9, 2),
    pytest.param(4, 2, 7, 2, marks=pytest.mark.slow),  # two step groups; 4 processes
])
def test_toy_loop_follows_the_parastep_recurrence_bitwise(world_size, degree, steps, warmup):
    results = run_ranks(f"{HERE}:toy_run", world_size, {"steps": steps, "warmup": warmup, "degree": degree},
                        timeout=60)
    expected = parastep_replay(steps, warmup, degree)
    assert not torch.equal(expected, ToyPipeline()(steps))  # the recurrence is not the plain loop
    windows = math.ceil((steps - warmup) / degree)
    for rank, (first, second, counts, after_uninstall) in enumerate(results):
        assert torch.equal(first, expected), f"rank {rank}"
        assert torch.equal(second, expected), f"rank {rank}: second request"
        assert torch.equal(after_uninstall, ToyPipeline()(steps)), f"rank {rank}: uninstall"
        assert counts["windows"] == windows
        assert counts["evaluated"] + counts["skipped"] == steps
    # 9 steps, warm-up 2, 3 ranks: windows of 3, 3, 1 -> rank 2 evaluates twice after warm-up.
    if world_size == 3:
        assert [c["evaluated"] for _, _, c, _ in results] == [2 + 3, 2 + 2, 2 + 2]
        assert results[0][2]["predicted"] == 4 and results[1][2]["reused"] == 2 + 2 + 1


def toy_auto_run(rank: int, world_size: int, steps: int, warmup: int, floor: str, rates: list[str]):
    """Per fake link rate: three requests with ``--compression auto`` (the session begun before
    each, as the request loop does), then three with the codec auto chose; and one without
    compression. Returns the latents, decisions, reports, step stats and cache check."""
    from compactfusion_xdit import envs
    from compactfusion_xdit.core.config import CompressionConfig
    from compactfusion_xdit.core.session import CompressionSession

    def requests(session):
        pipe = ToyPipeline()
        mode = StepParallel(world_size, warmup, session=session)
        mode.install(pipe)
        outs = []
        for _ in range(3):
            if session is not None:
                session.begin_request()
            outs.append(pipe(steps))
        mode.uninstall()
        return outs

    out = {"plain": requests(None)[0]}
    for rate in rates:
        os.environ[envs.AUTO_LINK_MBPS] = rate
        session = CompressionSession(CompressionConfig.parse("auto", auto_floor=floor))
        latents = requests(session)
        chosen = session.state.auto.decision["step"]
        fixed = CompressionSession(chosen)
        out[rate] = dict(latents=latents, decision=session.state.auto.decision, report=session.stats()["auto"],
                         stats=session.stats()["paths"]["step"], mismatches=session.check_caches(),
                         fixed=requests(fixed), fixed_stats=fixed.stats()["paths"]["step"])
    return out


def test_auto_agrees_between_requests_and_codes_like_the_codec_it_chose():
    """2 ranks, 9 steps, warm-up 2: the first request measures (raw: the uncompressed latents
    bitwise), the ranks agree when the second starts, and from then on each request equals the run
    with the chosen codec bitwise: the floor on a slow link, none on a fast one."""
    slow, fast = "0.001", "1e9"  # MB/s
    results = run_ranks(f"{HERE}:toy_auto_run", 2, {"steps": 9, "warmup": 2, "floor": "residual-int4",
                                                   "rates": [slow, fast]}, timeout=60)
    for rate, chosen in ((slow, "residual-int4"), (fast, "none")):
        runs = [r[rate] for r in results]
        assert [r["decision"] for r in runs] == [{"step": chosen}] * 2 and runs[0]["report"] == runs[1]["report"]
        for rank, r in enumerate(runs):
            first, *decided = r["latents"]
            assert torch.equal(first, results[rank]["plain"]), f"rank {rank}"
            assert all(torch.equal(x, y) for x, y in zip(decided, r["fixed"][1:])), f"rank {rank}"
            assert r["mismatches"] == []
        coded = runs[1]["stats"]["coded_messages"]  # rank 1's predictions: 2 coded per decided request
        assert coded == (4 if chosen != "none" else 0) and runs[1]["fixed_stats"]["coded_messages"] == 3 * coded // 2
    assert not torch.equal(results[0][slow]["latents"][1], results[0]["plain"])  # coded for real


@pytest.mark.slow  # two worker launches on 2 ranks (12 s here)
def test_auto_through_the_worker_codes_the_second_request_like_the_chosen_codec():
    """``xfuser``'s rank code, step degree 2, two requests per launch, a slow fake link: the first
    request raw, the second agreed (the floor) at its start and equal to the fixed floor's run."""
    from compactfusion_xdit.cli.ports import free_port

    base = ["--model", "tiny-flux", "--height", "64", "--width", "64", "--num_inference_steps", str(STEPS),
            "--prompt", "a cat", "--prompt", "a cat", "--max_sequence_length", "16", "--seed", "42",
            "--output_type", "latent", "--step_parallel_degree", "2", "--step_parallel_warmup", "1",
            "--compression-check"]
    runs = [(base + ["--compression", "auto"], "0.001"), (base + ["--compression", "residual-int2"], "")]
    per_rank = run_ranks("compactfusion_xdit.testing.targets:worker_served_in_turn", 2,
                         {"runs": runs, "ports": [free_port() for _ in runs]}, timeout=TIMEOUT, init_process_group=False)
    auto_run, fixed = per_rank[-1]
    assert [r[0]["decision"] for r in per_rank] == [{"step": "residual-int2"}] * 2
    first, second = auto_run["stats"]
    assert first["sent_bytes"] == first["raw_bytes"] and second["sent_bytes"] < second["raw_bytes"]
    assert second["auto"]["step"]["codec"] == "residual-int2" and second["cache_consistent"] is True
    assert not torch.equal(auto_run["latents"][0], fixed["latents"][1])  # raw, then coded
    assert torch.equal(auto_run["latents"][1], fixed["latents"][1])


# --------------------------------------------------------------------------------------------
# Tiny diffusers pipelines (one 2-rank launch runs every plan)
# --------------------------------------------------------------------------------------------

#: model -> (warm-up, compression) runs, after the model's single-process run.
PLANS = {
    "tiny-flux": [(w, None) for w in WARMUPS] + [(4, "residual-int4"), (1, "residual-int4")],
    "tiny-sd3": [(w, None) for w in WARMUPS],
    "tiny-pixart": [(STEPS, None), (2, None)],
}
MODELS = list(PLANS)


def pipelines_run(rank: int, world_size: int, plans: dict) -> dict:
    """Per model: the single-process latents, then per (warm-up, compression) the step-parallel
    latents of two requests, the mode's counts and the session's stats after the first request."""
    from diffusers import DiffusionPipeline

    from compactfusion_xdit.models import tiny
    from compactfusion_xdit.core.session import CompressionSession

    results = {}
    for model, plan in plans.items():
        pipe = DiffusionPipeline.from_pretrained(tiny.materialize(model))
        pipe.set_progress_bar_config(disable=True)

        def call():
            kwargs = dict(prompt="a cat", num_inference_steps=STEPS, height=64, width=64, output_type="latent",
                          generator=torch.Generator().manual_seed(42))
            if model != "tiny-flux":
                kwargs["guidance_scale"] = 5.0  # CFG: the transformer sees a batch of 2
            if model == "tiny-pixart":
                kwargs["use_resolution_binning"] = False  # else 64x64 becomes a 1024x1024 bin
            else:
                kwargs["max_sequence_length"] = 16
            return pipe(**kwargs).images

        out = results[model] = {"single": call()}
        for warmup, compression in plan:
            session = CompressionSession(compression) if compression else None
            mode = StepParallel(world_size, warmup, session=session)
            mode.install(pipe)
            try:
                first = call()
                stats = session.stats() if session else None
                out[warmup, compression] = dict(latents=first, again=call(), counts=dict(mode.counts), stats=stats)
            finally:
                mode.uninstall()
    return results


@pytest.fixture(scope="module")
def runs():
    """Rank -> model -> results of `pipelines_run` on 2 ranks."""
    return run_ranks(f"{HERE}:pipelines_run", 2, {"plans": PLANS}, timeout=TIMEOUT)


@pytest.mark.parametrize("model", MODELS)
def test_warmup_equal_to_steps_gives_the_single_process_latents(model, runs):
    for rank, by_model in enumerate(runs):
        out = by_model[model][STEPS, None]
        assert torch.equal(out["latents"], runs[0][model]["single"]), f"rank {rank}"
        assert out["counts"]["windows"] == 0


@pytest.mark.parametrize("model", MODELS)
def test_fewer_warmup_steps_stay_within_measured_bounds(model, runs):
    single = runs[0][model]["single"]
    for warmup, bound in MIN_PSNR[model].items():
        latents = runs[0][model][warmup, None]["latents"]
        assert not torch.equal(latents, single)  # steps were really predicted
        assert bound <= psnr(single, latents) < math.inf, f"warm-up {warmup}"
        # every rank ends with rank 0's latents; a second request repeats the first exactly
        for rank, by_model in enumerate(runs):
            out = by_model[model][warmup, None]
            assert torch.equal(out["latents"], latents), f"rank {rank}, warm-up {warmup}"
            assert torch.equal(out["again"], latents), f"rank {rank}, warm-up {warmup}"
        windows = math.ceil((STEPS - warmup) / 2)
        assert runs[0][model][warmup, None]["counts"] == dict(
            evaluated=warmup + windows, skipped=STEPS - warmup - windows, reused=0,
            predicted=STEPS - warmup - windows, windows=windows)


def int4_wire_nbytes(shape: torch.Size) -> int:
    """int4: ceil(C/2) data bytes and a bf16 scale per row (rows = all leading dims)."""
    rows, cols = math.prod(shape[:-1]), shape[-1]
    return rows * (-(-cols // 2)) + 2 * rows


def expected_step_stats(warmup: int, shape: torch.Size, rank: int) -> dict:
    """``step`` traffic of one request, 2 ranks, compression warm-up 1 (window 0 seeds the caches).
    Rank 0 broadcasts the latents at every window end: window 0 raw (seed), the final one raw, the
    others coded. Rank 1 sends its prediction in every window with a round 1: window 0 raw, then coded."""
    raw, coded = math.prod(shape) * 4, int4_wire_nbytes(shape)
    windows = math.ceil((STEPS - warmup) / 2)
    if rank == 0:
        n_coded = max(windows - 2, 0)
        n_raw = windows - n_coded
    else:
        sends = (STEPS - warmup) // 2
        n_coded, n_raw = sends - 1, 1
    return dict(messages=n_raw + n_coded, raw_bytes=(n_raw + n_coded) * raw, sent_bytes=n_raw * raw + n_coded * coded,
                raw_messages=n_raw, coded_messages=n_coded, reseeds=0, nonfinite_rows=0)


@pytest.mark.parametrize("warmup", [4, 1])
def test_residual_int4_step_bytes_follow_the_payload_arithmetic(warmup, runs):
    shape = runs[0]["tiny-flux"]["single"].shape  # Flux packs latents as (batch, tokens, channels)
    for rank in range(2):
        stats = runs[rank]["tiny-flux"][warmup, "residual-int4"]["stats"]
        assert stats["paths"]["step"] == expected_step_stats(warmup, shape, rank), f"rank {rank}"


@pytest.mark.parametrize("warmup", [4, 1])
def test_residual_int4_stays_within_a_measured_margin_of_its_uncompressed_twin(warmup, runs):
    flux = runs[0]["tiny-flux"]
    single, twin = flux["single"], flux[warmup, None]["latents"]
    compressed = flux[warmup, "residual-int4"]["latents"]
    assert not torch.equal(compressed, twin)
    assert psnr(single, compressed) >= psnr(single, twin) - INT4_MARGIN_DB
    # the final broadcast is raw: every rank holds rank 0's latents; the caches reset per request
    assert torch.equal(runs[1]["tiny-flux"][warmup, "residual-int4"]["latents"], compressed)
    assert torch.equal(flux[warmup, "residual-int4"]["again"], compressed)


# --------------------------------------------------------------------------------------------
# The xfuser command
# --------------------------------------------------------------------------------------------


def test_xfuser_command_runs_step_parallel_and_matches_the_diffusers_run(runs, tmp_path):
    """``xfuser --step_parallel_degree 2`` (xfuser's Flux pipeline wrapper, 2 ranks) gives bitwise the
    latents of the same mode on the plain diffusers pipeline, and stats.json sums both ranks' bytes."""
    import shutil
    import subprocess
    import sys

    import numpy as np

    script = shutil.which("xfuser")
    command = [script] if script else [sys.executable, "-m", "compactfusion_xdit.cli.launcher"]
    argv = ["--model", "tiny-flux", "--step_parallel_degree", "2", "--step_parallel_warmup", "1",
            "--compression", "residual-int4", "--height", "64", "--width", "64", "--num_inference_steps", str(STEPS),
            "--prompt", "a cat", "--max_sequence_length", "16", "--seed", "42", "--output_type", "latent",
            "--output_dir", str(tmp_path)]
    proc = subprocess.run(command + argv, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    latents = torch.from_numpy(np.load(tmp_path / "latents.npy"))
    assert torch.equal(latents, runs[0]["tiny-flux"][1, "residual-int4"]["latents"])
    with open(tmp_path / "stats.json") as f:
        step = json.load(f)["paths"]["step"]
    shape = runs[0]["tiny-flux"]["single"].shape
    expected = [expected_step_stats(1, shape, rank) for rank in range(2)]
    assert step == {k: sum(e[k] for e in expected) for k in ("raw_bytes", "sent_bytes", "messages")}



@pytest.mark.slow
def test_step_parallel_composes_with_cfg_parallel():
    """Through the worker on SD3: step 2 x xfuser's CFG parallel 2 (4 ranks; each CFG pair skips the
    transformer together) gives the latents of step 2 alone (2 ranks) up to fp32 round-off
    (measured 1.2e-6)."""
    argv = ["--model", "tiny-sd3", "--step_parallel_degree", "2", "--step_parallel_warmup", "2",
            "--guidance_scale", "5.0", "--height", "64", "--width", "64", "--num_inference_steps", str(STEPS),
            "--prompt", "a cat", "--max_sequence_length", "16", "--seed", "42", "--output_type", "latent"]
    alone = run_ranks(WORKER_LATENTS, 2, {"argv": argv}, timeout=TIMEOUT, init_process_group=False)[-1]
    with_cfg = run_ranks(WORKER_LATENTS, 4, {"argv": argv + ["--use_cfg_parallel"]}, timeout=TIMEOUT,
                         init_process_group=False)[-1]
    assert (with_cfg - alone).abs().max().item() <= 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("sp_flag", ["--ulysses_degree", "--ring_degree"])
def test_step_parallel_composes_with_sequence_parallel(sp_flag):
    """Through the worker on Flux: step 2 x Ulysses 2 or ring 2 (4 ranks) gives the latents of step 2
    alone up to fp32 round-off (measured 6e-7 and 5e-7)."""
    argv = ["--model", "tiny-flux", "--step_parallel_degree", "2", "--step_parallel_warmup", "2",
            "--height", "64", "--width", "64", "--num_inference_steps", str(STEPS),
            "--prompt", "a cat", "--max_sequence_length", "16", "--seed", "42", "--output_type", "latent"]
    alone = run_ranks(WORKER_LATENTS, 2, {"argv": argv}, timeout=TIMEOUT, init_process_group=False)[-1]
    with_sp = run_ranks(WORKER_LATENTS, 4, {"argv": argv + [sp_flag, "2"]}, timeout=TIMEOUT,
                        init_process_group=False)[-1]
    assert (with_sp - alone).abs().max().item() <= 1e-4
