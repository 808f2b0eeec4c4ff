"""ParaStep on the seed papers' models (`models.tiny_seeds`), as plain diffusers pipelines on 2 CPU ranks.

* tiny-svd (image-to-video, a spatio-temporal UNet, Euler, guidance that varies per frame) and
  tiny-audioldm2 (a UNet with two cross-attention streams, DDIM, a waveform out): the mode wraps
  ``pipe.unet``; tiny-cogvideox (DDIM, CFG batch 2): ``pipe.transformer``.
* Warm-up = steps gives the single-process output bitwise on both ranks; warm-up 2 stays within a
  measured bound (latents: PSNR over the reference's range; audio: SNR of the waveform); every rank
  ends with rank 0's output.
* ``residual-int4``: the ``step`` byte counts follow the payload arithmetic exactly.

Folders are the built-ins saved by ``save_pretrained`` and loaded with ``DiffusionPipeline.from_pretrained``.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from compactfusion_xdit.benchmarks.metrics import range_psnr, snr
from compactfusion_xdit.testing import run_ranks

HERE = os.path.abspath(__file__)
TIMEOUT = 480.0
STEPS = 8
WARMUP = 2
MODELS = ("tiny-svd", "tiny-cogvideox", "tiny-audioldm2")
# Measured (2 ranks, 8 steps, warm-up 2, seed 42), latents PSNR over the reference's range:
#   tiny-svd 52.1 dB, tiny-cogvideox 84.2 dB, tiny-audioldm2 15.2 dB; AudioLDM2's waveform SNR 1.9 dB.
# The tiny AudioLDM2's random UNet predicts very differently from one DDIM step to the next, so a
# reused prediction costs much more there than on the other two (and its random vocoder amplifies it).
MIN_PSNR = {"tiny-svd": 49.0, "tiny-cogvideox": 81.0, "tiny-audioldm2": 13.0}
MIN_WAVEFORM_SNR = 1.0


def call_kwargs(model: str, output_type: str) -> dict:
    from compactfusion_xdit.models import tiny_seeds

    kwargs = dict(num_inference_steps=STEPS, output_type=output_type, generator=torch.Generator().manual_seed(42))
    if model == "tiny-svd":
        kwargs.update(image=tiny_seeds.default_image(), height=32, width=32, num_frames=4, decode_chunk_size=4)
    elif model == "tiny-cogvideox":
        kwargs.update(prompt="a cat", height=32, width=32, num_frames=9, guidance_scale=5.0, max_sequence_length=16)
    else:
        kwargs.update(prompt="a cat")
    return kwargs


def output(out) -> torch.Tensor:
    """The latents of a pipeline called with ``output_type="latent"``."""
    value = out.audios if hasattr(out, "audios") else out.frames
    return torch.as_tensor(value).float()


def waveform(pipe, latents: torch.Tensor) -> torch.Tensor:
    """AudioLDM2's waveform of `latents`: its post-processing (VAE decode to a mel spectrogram, vocoder)."""
    with torch.no_grad():
        mel = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
        return pipe.mel_spectrogram_to_waveform(mel).float()


def seeds_run(rank: int, world_size: int, models: list[str]) -> dict:
    """Per model: the single-process latents, then step parallel (warm-up STEPS, warm-up 2 twice, warm-up 2
    with residual-int4: latents, counts, stats); AudioLDM2 also the waveforms of single and warm-up 2."""
    from diffusers import DiffusionPipeline

    from compactfusion_xdit.core.session import CompressionSession
    from compactfusion_xdit.models import tiny_seeds
    from compactfusion_xdit.modes.step_parallel import StepParallel

    results = {}
    for model in models:
        pipe = DiffusionPipeline.from_pretrained(tiny_seeds.materialize(model))
        pipe.set_progress_bar_config(disable=True)
        out = results[model] = {"single": output(pipe(**call_kwargs(model, "latent")))}
        for warmup, compression in ((STEPS, None), (WARMUP, None), (WARMUP, "residual-int4")):
            session = CompressionSession(compression) if compression else None
            mode = StepParallel(world_size, warmup, session=session)
            mode.install(pipe)
            try:
                first = output(pipe(**call_kwargs(model, "latent")))
                stats = session.stats() if session else None
                again = output(pipe(**call_kwargs(model, "latent"))) if compression is None and warmup < STEPS else None
                out[warmup, compression] = dict(output=first, again=again, counts=dict(mode.counts), stats=stats)
            finally:
                mode.uninstall()
        if model == "tiny-audioldm2":
            out["waveforms"] = (waveform(pipe, out["single"]), waveform(pipe, out[WARMUP, None]["output"]))
    return results


@pytest.fixture(scope="module")
def runs():
    from compactfusion_xdit.models import tiny_seeds

    for model in MODELS:  # once, before the ranks start
        tiny_seeds.materialize(model)
    return run_ranks(f"{HERE}:seeds_run", 2, {"models": list(MODELS)}, timeout=TIMEOUT)


def test_the_mode_wraps_the_unet_where_there_is_no_transformer():
    from compactfusion_xdit.modes.step_parallel import backbone

    class Unet:
        unet, transformer = object(), None

    assert backbone(Unet()) is Unet.unet


@pytest.mark.parametrize("model", MODELS)
def test_warmup_equal_to_steps_gives_the_single_process_output(model, runs):
    for rank, by_model in enumerate(runs):
        out = by_model[model][STEPS, None]
        assert torch.equal(out["output"], runs[0][model]["single"]), f"rank {rank}"
        assert out["counts"]["windows"] == 0 and out["counts"]["evaluated"] == STEPS


@pytest.mark.parametrize("model", MODELS)
def test_warmup_2_stays_within_the_measured_bound(model, runs):
    single = runs[0][model]["single"]
    got = runs[0][model][WARMUP, None]
    assert not torch.equal(got["output"], single)  # steps were really predicted
    assert MIN_PSNR[model] <= range_psnr(single, got["output"]) < math.inf
    for rank, by_model in enumerate(runs):  # every rank ends with rank 0's output; state resets per request
        assert torch.equal(by_model[model][WARMUP, None]["output"], got["output"]), f"rank {rank}"
        assert torch.equal(by_model[model][WARMUP, None]["again"], got["output"]), f"rank {rank}"
    windows = math.ceil((STEPS - WARMUP) / 2)
    assert got["counts"] == dict(evaluated=WARMUP + windows, skipped=STEPS - WARMUP - windows, reused=0,
                                 predicted=STEPS - WARMUP - windows, windows=windows)


def test_audioldm2_waveform_with_warmup_2_stays_within_the_measured_snr(runs):
    single, got = runs[0]["tiny-audioldm2"]["waveforms"]
    assert single.shape == got.shape and single.shape[-1] == 512  # 0.032 s at 16 kHz
    assert MIN_WAVEFORM_SNR <= snr(single, got) < math.inf


def int4_wire_nbytes(shape: tuple) -> int:
    """docs/codec_format.md, int4: ceil(C/2) data bytes and a bf16 scale per row (rows = all leading dims)."""
    rows, cols = math.prod(shape[:-1]), shape[-1]
    return rows * (-(-cols // 2)) + 2 * rows


def expected_step_stats(shape: tuple, rank: int) -> dict:
    """One request, 2 ranks, warm-up 2, compression warm-up 1 (window 0 seeds the caches): rank 0
    broadcasts the latents at each window end (window 0 and the final one raw, the others coded);
    rank 1 sends its prediction in every window (window 0 raw, then coded)."""
    raw, coded = math.prod(shape) * 4, int4_wire_nbytes(shape)
    windows = math.ceil((STEPS - WARMUP) / 2)
    n_coded = max(windows - 2, 0) if rank == 0 else (STEPS - WARMUP) // 2 - 1
    n_raw = (windows - n_coded) if rank == 0 else 1
    return dict(messages=n_raw + n_coded, raw_bytes=(n_raw + n_coded) * raw, sent_bytes=n_raw * raw + n_coded * coded,
                raw_messages=n_raw, coded_messages=n_coded, reseeds=0, nonfinite_rows=0)


@pytest.mark.parametrize("model", MODELS)
def test_residual_int4_step_bytes_follow_the_payload_arithmetic(model, runs):
    shape = runs[0][model]["single"].shape
    for rank in range(2):
        stats = runs[rank][model][WARMUP, "residual-int4"]["stats"]
        assert stats["paths"]["step"] == expected_step_stats(shape, rank), f"rank {rank}"
    assert torch.equal(runs[1][model][WARMUP, "residual-int4"]["output"], runs[0][model][WARMUP, "residual-int4"]["output"])


@pytest.mark.slow
def test_step_parallel_composes_with_ulysses_ring_and_cfg_on_cogvideox():
    """Through the worker (``xFuserCogVideoXPipeline``): step 2 x Ulysses 2, x ring 2 and x CFG parallel 2
    (4 ranks each) give the latents of step 2 alone (2 ranks) up to fp32 round-off, as on Flux."""
    from compactfusion_xdit.models import tiny_seeds
    from compactfusion_xdit.testing import free_port

    tiny_seeds.materialize("tiny-cogvideox")
    argv = ["--model", "tiny-cogvideox", "--step_parallel_degree", "2", "--step_parallel_warmup", "2",
            "--guidance_scale", "5.0", "--prompt", "a cat", "--seed", "42", "--output_type", "latent"]
    target = "compactfusion_xdit.testing.targets:worker_runs"
    (alone, _), = run_ranks(target, 2, {"runs": [argv], "ports": [free_port()]}, timeout=TIMEOUT,
                            init_process_group=False)[-1]
    composed = [argv + ["--ulysses_degree", "2"], argv + ["--ring_degree", "2"], argv + ["--use_cfg_parallel"]]
    out = run_ranks(target, 4, {"runs": composed, "ports": [free_port() for _ in composed]}, timeout=TIMEOUT,
                    init_process_group=False)[-1]
    for flags, (latents, _) in zip(composed, out):
        assert (latents - alone).abs().max().item() <= 1e-4, flags[-2:]
