"""The seed papers' pipelines from local folders (``save_pretrained`` in the test) through both commands.

* CogVideoX through ``cfx-xdit`` (the CogVideoX runner model of `patches.runner_models`) and the
  ``xfuser`` command (``xFuserCogVideoXPipeline``): an mp4 of 9 frames (PNG frames + .npy without PyAV).
* Stable Video Diffusion through the ``xfuser`` command with step parallelism 2 (a UNet pipeline,
  loaded as a plain diffusers pipeline; the conditioning image is the built-in gradient): 4 frames.
* AudioLDM2 through the ``xfuser`` command with step parallelism 2: ``audio_0.wav`` (mono 16-bit PCM at
  the vocoder's 16 kHz, 512 samples) and ``audio.npy``, whose waveform the WAV holds.
* The launchers refuse Ulysses on a UNet pipeline with one line naming the fix.

The command runs are ``-m slow`` (one 1-rank and one 2-rank launch, ~50 s of CPU); the WAV writer
and the refusal run in CI.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import wave

import numpy as np
import pytest

from compactfusion_xdit.testing import free_port, run_ranks

HERE = os.path.abspath(__file__)
REPO = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
TIMEOUT = 480


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, str]:
    from compactfusion_xdit.models import tiny_seeds

    root = tmp_path_factory.mktemp("seed-models")
    paths = {}
    for name in tiny_seeds.NAMES:
        paths[name] = str(root / name)
        tiny_seeds.build_pipeline(name).save_pretrained(paths[name])
    return paths


def commands_in_turn(rank: int, world_size: int, runner_argvs: list[list[str]], worker_argvs: list[list[str]],
                     ports: list[int]) -> list[int]:
    """Rank target: drop-in runner runs, then ``xfuser``-command worker runs, each on its own port."""
    from compactfusion_xdit.rank import runner, worker

    codes = []
    for argv, port in zip([*runner_argvs, *worker_argvs], ports):
        os.environ["MASTER_PORT"] = str(port)
        codes.append(runner.main(argv) if argv in runner_argvs else worker.main(argv))
    return codes


def video_frames(directory, stem: str) -> np.ndarray:
    """The frames of ``stem.mp4`` (PyAV), else of ``stem.npy`` (uint8, frames x height x width x 3)."""
    from compactfusion_xdit.rank import outputs

    if outputs.video_backend() == "mp4":
        import av

        with av.open(str(directory / f"{stem}.mp4")) as container:
            return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    return np.load(directory / f"{stem}.npy")


def size_flags(name: str) -> list[str]:
    frames = {"tiny-cogvideox": "9", "tiny-svd": "4"}.get(name)
    return ["--height", "32", "--width", "32", "--num_frames", frames] if frames else []


@pytest.fixture(scope="module")
def written(folders, tmp_path_factory) -> dict:
    """Run every command once; name -> its output directory."""
    out = tmp_path_factory.mktemp("seed-outputs")
    common = ["--num_inference_steps", "4", "--prompt", "a cat", "--max_sequence_length", "16", "--seed", "42"]
    runner_argvs = [["--model", folders["tiny-cogvideox"], *size_flags("tiny-cogvideox"), *common,
                     "--output_directory", str(out / "cfx-xdit-cogvideox")]]
    # 6 steps, warm-up 2: two windows, the second one coded
    step = ["--num_inference_steps", "6", "--step_parallel_degree", "2", "--step_parallel_warmup", "2",
            "--compression", "residual-int4"]
    worker_1 = [["--model", folders["tiny-cogvideox"], *size_flags("tiny-cogvideox"), *common,
                 "--output_dir", str(out / "xfuser-cogvideox")]]
    worker_2 = [["--model", folders[n], *size_flags(n), *common, *step, "--output_dir", str(out / f"xfuser-{n}")]
                for n in ("tiny-svd", "tiny-audioldm2")]
    (codes,) = run_ranks(f"{HERE}:commands_in_turn", 1, {"runner_argvs": runner_argvs, "worker_argvs": worker_1,
                                                         "ports": [free_port(), free_port()]},
                         timeout=TIMEOUT, init_process_group=False)
    codes2 = run_ranks(f"{HERE}:commands_in_turn", 2, {"runner_argvs": [], "worker_argvs": worker_2,
                                                       "ports": [free_port(), free_port()]},
                       timeout=TIMEOUT, init_process_group=False)
    assert codes == [0, 0] and codes2 == [[0, 0], [0, 0]]
    return {"cfx-xdit-cogvideox": out / "cfx-xdit-cogvideox", **{f"xfuser-{n}": out / f"xfuser-{n}"
                                                                 for n in ("cogvideox", "tiny-svd", "tiny-audioldm2")}}


def stem_of(stats: dict, suffix: str) -> str:
    (name,) = {os.path.splitext(p)[0].split(os.sep)[0] for p in stats["outputs"] if p.endswith(suffix)}
    return name


@pytest.mark.slow
@pytest.mark.parametrize("run, frames", [("cfx-xdit-cogvideox", 9), ("xfuser-cogvideox", 9), ("xfuser-tiny-svd", 4)])
def test_a_video_folder_writes_every_frame(written, run, frames):
    from compactfusion_xdit.rank import outputs

    directory = written[run]
    stats = json.loads((directory / "stats.json").read_text())
    suffix = ".mp4" if outputs.video_backend() == "mp4" else ".npy"
    stem = stem_of(stats, suffix)
    assert video_frames(directory, stem).shape == (frames, 32, 32, 3)
    if run.startswith("xfuser"):
        assert stem == "video_0" and stats["pipeline"] in ("CogVideoXPipeline", "StableVideoDiffusionPipeline")


@pytest.mark.slow
def test_svd_step_parallel_sends_coded_step_traffic(written):
    stats = json.loads((written["xfuser-tiny-svd"] / "stats.json").read_text())
    assert stats["parallel"]["step"] == 2 and 0 < stats["paths"]["step"]["sent_bytes"] < stats["paths"]["step"]["raw_bytes"]


@pytest.mark.slow
def test_audioldm2_writes_a_wav_at_the_vocoder_rate_and_the_waveforms_as_npy(written):
    directory = written["xfuser-tiny-audioldm2"]
    stats = json.loads((directory / "stats.json").read_text())
    assert stats["pipeline"] == "AudioLDM2Pipeline" and stats["sample_rate"] == 16000
    assert stats["outputs"] == ["audio_0.wav", "audio.npy"]
    waveforms = np.load(directory / "audio.npy")
    with wave.open(str(directory / "audio_0.wav")) as wav:
        assert (wav.getnchannels(), wav.getsampwidth(), wav.getframerate()) == (1, 2, 16000)
        pcm = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2")
    assert waveforms.shape == (1, 512) and waveforms.dtype == np.float32 and pcm.shape == (512,)
    assert np.array_equal(pcm, (np.clip(waveforms[0], -1, 1) * 32767).round().astype("<i2"))


def test_wav_holds_the_waveform_as_16_bit_pcm(tmp_path):
    from compactfusion_xdit.rank import outputs

    waveforms = np.sin(np.linspace(0, 20, 2 * 300, dtype=np.float32)).reshape(2, 300) * 1.2  # clipped at +-1
    paths = outputs.save_audio(waveforms, str(tmp_path / "a"), sample_rate=22050)
    assert [os.path.basename(p) for p in paths] == ["a_0.wav", "a_1.wav", "a.npy"]
    assert np.array_equal(np.load(tmp_path / "a.npy"), waveforms)
    for i in range(2):
        with wave.open(str(tmp_path / f"a_{i}.wav")) as wav:
            assert (wav.getnchannels(), wav.getsampwidth(), wav.getframerate(), wav.getnframes()) == (1, 2, 22050, 300)
            pcm = np.frombuffer(wav.readframes(300), dtype="<i2")
        assert np.array_equal(pcm, (np.clip(waveforms[i], -1, 1) * 32767).round().astype("<i2"))


@pytest.mark.parametrize("model", ["tiny-svd", "tiny-audioldm2"])
def test_ulysses_on_a_unet_pipeline_is_one_line_naming_the_fix(model):
    proc = subprocess.run([sys.executable, "-m", "compactfusion_xdit.cli.launcher", "--model", model,
                           "--ulysses_degree", "2"], cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=120)
    lines = [line for line in proc.stderr.strip().splitlines() if "error" in line]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    name = {"tiny-svd": "StableVideoDiffusionPipeline", "tiny-audioldm2": "AudioLDM2Pipeline"}[model]
    assert f"{name} is a UNet pipeline that xfuser cannot split; drop --ulysses_degree 2" in lines[0]
