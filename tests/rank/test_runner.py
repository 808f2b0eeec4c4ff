"""The drop-in runner (``cfx-xdit`` / ``python -m compactfusion_xdit.rank.runner``), real models from local
folders, the Python API, the one-line switches, and the errors users hit first.

Local folders are the tiny pipelines of `models.tiny` and `models.tiny_more` saved by
``save_pretrained`` (no download exists here): each stands in for a downloaded Flux.1-dev, SD3.5,
PixArt-alpha/-sigma, Wan2.1 T2V or HunyuanVideo folder, loaded by xfuser 0.7.0's own runner model of
its pipeline class.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from compactfusion_xdit.models import tiny, tiny_more
from compactfusion_xdit.testing import run_ranks

HERE = os.path.abspath(__file__)
REPO = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
QUICK = 120
LAUNCH = 300

#: model folder -> (file the runner writes for one request, built by)
LOCAL_MODELS = {
    "tiny-flux": ("flux_1_dev_0.png", tiny),
    "tiny-sd3": ("stable_diffusion_3_5_large_0.png", tiny),
    "tiny-pixart": ("pixart_alpha_0.png", tiny),
    "tiny-pixart-sigma": ("pixart_sigma_0.png", tiny_more),
    "tiny-wan": ("wan2.1_t2v_0.mp4", tiny_more),
    "tiny-hunyuan-video": ("hunyuan_video_0.mp4", tiny_more),
}


@pytest.fixture(scope="module")
def folders() -> dict[str, str]:
    return {name: module.materialize(name) for name, (_, module) in LOCAL_MODELS.items()}


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def runner_in_turn(rank: int, world_size: int, argvs: list[list[str]], worker_argvs: list[list[str]] = ()) -> list[int]:
    """Rank target: several drop-in runner runs, then ``xfuser``-command worker runs, one after
    another in this process."""
    from compactfusion_xdit.rank import runner
    from compactfusion_xdit.rank import worker

    return [runner.main(argv) for argv in argvs] + [worker.main(argv) for argv in worker_argvs]


def expected_output(name: str) -> str:
    """A video is an mp4 with PyAV installed, else PNG frames plus the frames as .npy."""
    from compactfusion_xdit.rank import outputs

    if name.endswith(".mp4") and outputs.video_backend() != "mp4":
        return name[: -len(".mp4")] + ".npy"
    return name


def assert_output(path, height: int, width: int, frames: int) -> None:
    """The file decodes to what was asked: an image of that size, or a video of that many frames."""
    import numpy as np
    from PIL import Image

    if path.suffix == ".png":
        with Image.open(path) as image:
            assert image.size == (width, height), (path, image.size)
    elif path.suffix == ".npy":  # video frames without PyAV: (frames, height, width, 3) uint8
        array = np.load(path)
        assert array.shape == (frames, height, width, 3) and array.dtype == np.uint8, (path, array.shape)
    else:
        import av

        with av.open(str(path)) as container:
            decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        assert len(decoded) == frames and decoded[0].shape == (height, width, 3), (path, len(decoded))


def one_request(model_folder: str, out: str, *flags: str) -> list[str]:
    return ["--model", model_folder, "--height", "32", "--width", "32", "--num_frames", "5", "--num_inference_steps",
            "2", "--prompt", "a cat", "--max_sequence_length", "16", "--output_directory", out, *flags]


# --------------------------------------------------------------------------------------------
# Real models from a local folder
# --------------------------------------------------------------------------------------------


def test_every_runner_model_loads_from_a_local_folder_and_writes_its_output(folders, tmp_path):
    names = list(LOCAL_MODELS)
    argvs = [one_request(folders[n], str(tmp_path / n)) for n in names]
    videos = ["tiny-wan", "tiny-hunyuan-video"]  # the `xfuser` command loads these through the runner models too
    worker_argvs = [["--model", folders[n], "--height", "32", "--width", "32", "--num_frames", "5",
                     "--num_inference_steps", "2", "--prompt", "a cat", "--max_sequence_length", "16",
                     "--output_dir", str(tmp_path / f"xfuser-{n}")] for n in videos]
    (codes,) = run_ranks(f"{HERE}:runner_in_turn", 1, {"argvs": argvs, "worker_argvs": worker_argvs},
                         timeout=LAUNCH, init_process_group=False)
    assert codes == [0] * (len(names) + len(videos))
    for n in videos:
        stats = json.loads((tmp_path / f"xfuser-{n}" / "stats.json").read_text())
        assert stats["pipeline"] in ("WanPipeline", "HunyuanVideoPipeline")
        assert expected_output("video_0.mp4") in stats["outputs"]
    for name in names:
        expected = expected_output(LOCAL_MODELS[name][0])
        assert_output(tmp_path / name / expected, height=32, width=32, frames=5)
        stats = json.loads((tmp_path / name / "stats.json").read_text())
        assert expected in stats["outputs"]


def test_a_folder_of_an_unserved_pipeline_is_named(tmp_path):
    from compactfusion_xdit.patches import runner_models

    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    with pytest.raises(runner_models.LocalModelError, match="holds a KandinskyPipeline; the runner serves local folders"):
        runner_models.register_local_folder(str(tmp_path))


def codecs_by_dtype(rank: int, world_size: int, argv: list[str], names: list[str], dtypes: list[str]) -> dict:
    """Rank target: one load, then every (dtype, codec) request; the last rank returns latents per pair
    and every rank its sent/raw bytes."""
    from compactfusion_xdit import patches
    from compactfusion_xdit.rank import worker
    from compactfusion_xdit.core.config import CompressionConfig

    args = worker.parse_args(argv)
    loaded = worker.load_pipeline(args)
    results = {}
    for dtype in dtypes:
        loaded.pipe.to(dtype=worker.DTYPES[dtype])
        for name in names:
            patches.install(CompressionConfig.parse(name))
            session = patches.session()
            if session is not None:
                session.begin_request(reset_stats=True)
            out = worker.call_pipeline(loaded, args)
            stats = session.stats() if session is not None else {"raw_bytes": 0, "sent_bytes": 0}
            last = rank == world_size - 1  # xfuser's pipelines return the output on the last rank
            results[(dtype, name)] = (out.images.float() if last else None, str(out.images.dtype) if last else None,
                                      stats["raw_bytes"], stats["sent_bytes"])
    return results


#: residual-int4 within this fraction of the output's largest magnitude, fp16 and bf16
#: (measured on tiny-flux, Ulysses 2, 32x32, 3 steps: 5.2e-4 in fp16, 4.1e-3 in bf16).
RESIDUAL_INT4_BOUND = 0.01
CODECS = ["none", "residual-int8", "residual-int4", "residual-int2", "residual-1bit", "residual-lowrank-4", "int4"]


def run_dtypes(names: list[str]) -> dict:
    """One two-rank Ulysses load of tiny-flux, cast to fp16 then bf16; each codec serves one request
    (torch 2.13 runs fp16 and bf16 matmuls on CPU). The last rank's results."""
    argv = ["--model", "tiny-flux", "--ulysses_degree", "2", "--height", "32", "--width", "32",
            "--num_inference_steps", "3", "--prompt", "a cat", "--max_sequence_length", "16", "--output_type", "latent",
            "--compression", "residual-int4"]
    return run_ranks(f"{HERE}:codecs_by_dtype", 2, {"argv": argv, "names": names, "dtypes": ["fp16", "bf16"]},
                     timeout=LAUNCH, init_process_group=False)[-1]


def check_dtypes(last: dict, names: list[str], bound: float) -> None:
    """Outputs are finite, of the cast dtype, within `bound` x the output's scale of the uncompressed
    output of the same dtype, and every compressed codec sends fewer bytes than raw."""
    for dtype, torch_name in (("fp16", "torch.float16"), ("bf16", "torch.bfloat16")):
        reference = last[(dtype, "none")][0]
        scale = reference.abs().max().item()
        for name in names:
            latents, out_dtype, raw, sent = last[(dtype, name)]
            assert out_dtype == torch_name, (dtype, name)
            assert torch.isfinite(latents).all(), (dtype, name)
            assert (latents - reference).abs().max().item() <= bound * scale, (dtype, name)
            if name != "none":
                assert 0 < sent < raw, (dtype, name, raw, sent)


@pytest.mark.slow  # CI time; tests/paths/test_bf16_fidelity.py runs bf16 on every path
def test_fp16_and_bf16_run_compressed(folders):
    check_dtypes(run_dtypes(["none", "residual-int4"]), ["none", "residual-int4"], bound=RESIDUAL_INT4_BOUND)


@pytest.mark.slow  # ~2 min of launches; run with -m slow
def test_fp16_and_bf16_run_with_every_codec(folders):
    check_dtypes(run_dtypes(CODECS), CODECS, bound=0.5)


# --------------------------------------------------------------------------------------------
# The drop-in command, end to end
# --------------------------------------------------------------------------------------------


@pytest.mark.slow  # CI time (~20 s); the runner tests below cover cfx-xdit
def test_cfx_xdit_two_ranks_two_requests_compressed_progress_and_summary_on_rank_0(folders, tmp_path):
    """Repeated --prompt: two requests through one launch, outputs numbered per request."""
    out = tmp_path / "out"
    argv = one_request(folders["tiny-flux"], str(out), "--ulysses_degree", "2", "--compression", "residual-int4",
                       "--prompt", "the dog")
    proc = subprocess.run([sys.executable, "-m", "compactfusion_xdit.cli.xdit_command", *argv], cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=LAUNCH)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summaries = [line for line in proc.stdout.splitlines() if line.startswith("done: ")]
    assert len(summaries) == 1, proc.stdout
    assert summaries[0].startswith("done: 2 requests in ") and "compression residual-int4: sent" in summaries[0]
    assert "ratio" in summaries[0]
    assert proc.stderr.count("denoising:   0%") == 2  # one bar per request, rank 0's only
    requests = json.loads((out / "stats.json").read_text())["requests"]
    assert [r["prompt"] for r in requests] == ["a cat", "the dog"]
    for n, stats in enumerate(requests):
        assert 0 < stats["sent_bytes"] < stats["raw_bytes"] and stats["paths"]["ulysses"]["messages"] > 0
        assert stats["outputs"] == [f"req{n:04d}_flux_1_dev_0.png"] and (out / stats["outputs"][0]).is_file()


# --------------------------------------------------------------------------------------------
# Python API and one-line switches
# --------------------------------------------------------------------------------------------


def api_run(rank: int, world_size: int, folder: str, compression: str):
    """Rank target: an xfuser-style script using compactfusion_xdit.xDiTParallel."""
    import compactfusion_xdit

    compactfusion_xdit.install(compression)  # CPU: gloo support before create_config
    from diffusers import FluxPipeline
    from xfuser import xFuserArgs

    engine_config, input_config = xFuserArgs(model=folder, ulysses_degree=2, height=32, width=32,
                                             num_inference_steps=3, prompt="a cat", max_sequence_length=16,
                                             output_type="latent").create_config()
    pipe = FluxPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    paral = compactfusion_xdit.xDiTParallel(pipe, engine_config, input_config, compression=compression)
    outs = []
    for _ in range(2):
        out = paral(height=32, width=32, prompt="a cat", num_inference_steps=3, max_sequence_length=16,
                    output_type="latent", generator=torch.Generator().manual_seed(42))
        outs.append(out.images.float() if out is not None and rank == world_size - 1 else None)
    stats, traffic = paral.stats(), paral.traffic()
    return outs, stats, traffic


def test_xdit_parallel_with_compression_counts_and_resets_per_call(folders):
    results = run_ranks(f"{HERE}:api_run", 2, {"folder": folders["tiny-flux"], "compression": "residual-int4"},
                        timeout=LAUNCH, init_process_group=False)
    (first, second), _, _ = results[-1]
    assert torch.equal(first, second)  # the second call starts from empty caches
    for _, stats, traffic in results:
        assert stats["compression"] == "residual-int4" and stats["cache_entries"] == 0
        assert 0 < stats["paths"]["ulysses"]["sent_bytes"] < stats["paths"]["ulysses"]["raw_bytes"]
    assert results[0][2]["raw_bytes"] == sum(r[1]["raw_bytes"] for r in results)  # summed over ranks


def test_launch_module_installs_before_the_script_runs(tmp_path):
    script = tmp_path / "example.py"
    script.write_text("import sys\nfrom compactfusion_xdit import patches\n"
                      "print(patches.session().config.name, sys.argv[1:])\n")
    proc = subprocess.run([sys.executable, "-m", "compactfusion_xdit.launch", "--compression", "residual-int2",
                           str(script), "--model", "x"], cwd=REPO, env=env(), capture_output=True, text=True,
                          timeout=QUICK)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "residual-int2 ['--model', 'x']"


def test_launch_help_lists_our_flags_and_a_scripts_help_reaches_the_script(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "compactfusion_xdit.launch", "--help"], cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=QUICK)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: python -m compactfusion_xdit.launch")
    assert "--compression NAME" in proc.stdout and "--compression-stats" in proc.stdout
    script = tmp_path / "example.py"
    script.write_text("import sys\nprint('script', sys.argv[1:])\n")
    proc = subprocess.run([sys.executable, "-m", "compactfusion_xdit.launch", str(script), "--help"], cwd=REPO,
                          env=env(), capture_output=True, text=True, timeout=QUICK)
    assert proc.returncode == 0 and proc.stdout.strip().splitlines()[-1] == "script ['--help']", proc.stderr[-2000:]


def test_ray_worker_hook_installs_the_compression_of_the_runtime_env():
    from compactfusion_xdit import ray_support

    runtime_env = ray_support.runtime_env("residual-int4", base={"env_vars": {"A": "1"}})
    assert runtime_env["worker_process_setup_hook"] == "compactfusion_xdit.ray_support.setup_worker"
    assert runtime_env["env_vars"] == {"A": "1", "CFX_COMPRESSION": "residual-int4"}
    code = ("from compactfusion_xdit import ray_support, patches; ray_support.setup_worker(); "
            "print(patches.session().config.name)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**env(), **runtime_env["env_vars"]},
                          capture_output=True, text=True, timeout=QUICK)
    assert proc.returncode == 0 and proc.stdout.strip().splitlines()[-1] == "residual-int4", proc.stderr[-2000:]


# --------------------------------------------------------------------------------------------
# Errors: one line, non-zero exit
# --------------------------------------------------------------------------------------------


def one_line_error(cmd: list[str], code: int = 2) -> str:
    proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=QUICK)
    assert proc.returncode == code, (proc.returncode, proc.stderr[-2000:])
    lines = [line for line in proc.stderr.strip().splitlines() if "error" in line]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    return lines[0]


@pytest.mark.parametrize("command", ["compactfusion_xdit.cli.xdit_command", "compactfusion_xdit.cli.launcher"])
def test_torch_compile_with_compression_is_refused(command, folders):
    line = one_line_error([sys.executable, "-m", command, "--model", folders["tiny-flux"], "--ulysses_degree", "2",
                           "--use_torch_compile", "--compression", "residual-int4"])
    assert "--use_torch_compile with --compression residual-int4 is not supported" in line


@pytest.mark.parametrize("command", ["compactfusion_xdit.cli.xdit_command", "compactfusion_xdit.cli.launcher"])
def test_master_port_in_use_is_refused_with_a_free_one_suggested(command, folders):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("", 0))
        busy.listen()
        port = busy.getsockname()[1]
        line = one_line_error([sys.executable, "-m", command, "--model", folders["tiny-flux"], "--ulysses_degree", "2",
                               "--master_port", str(port)])
    assert f"--master_port {port} is already in use on this machine; pass a free port" in line


def test_runner_names_a_missing_model_path():
    line = one_line_error([sys.executable, "-m", "compactfusion_xdit.rank.runner", "--model", "/no/such/model",
                           "--prompt", "a"])
    assert "--model '/no/such/model' is neither a model registered with xfuser's runner" in line


def test_runner_refuses_fp8_comms_with_compression():
    line = one_line_error([sys.executable, "-m", "compactfusion_xdit.cli.xdit_command", "--model", "FLUX.1-dev",
                           "--use_fp8_comms", "--compression", "residual-int4"])
    assert "--use_fp8_comms and --compression residual-int4" in line


# --------------------------------------------------------------------------------------------
# Output files and the closing line
# --------------------------------------------------------------------------------------------


def test_video_without_an_encoder_is_png_frames_plus_npy(tmp_path, monkeypatch):
    import numpy as np

    from compactfusion_xdit.rank import outputs

    monkeypatch.setattr(outputs, "video_backend", lambda: "frames")
    frames = np.random.default_rng(0).random((3, 8, 10, 3), dtype=np.float32)
    paths = outputs.save_video(frames, str(tmp_path / "v"), fps=8)
    assert [os.path.basename(p) for p in paths] == ["frame_0000.png", "frame_0001.png", "frame_0002.png", "v.npy"]
    assert np.array_equal(np.load(tmp_path / "v.npy"), (frames * 255).round().astype(np.uint8))


def test_video_with_pyav_is_an_mp4_of_every_frame(tmp_path):
    av = pytest.importorskip("av")
    import numpy as np

    from compactfusion_xdit.rank import outputs

    frames = np.random.default_rng(0).random((4, 16, 16, 3), dtype=np.float32)
    (path,) = outputs.save_video(frames, str(tmp_path / "v"), fps=8)
    with av.open(path) as container:
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert path.endswith(".mp4") and len(decoded) == 4 and decoded[0].shape == (16, 16, 3)


def test_summary_line_states_time_bytes_saved_and_ratio():
    from compactfusion_xdit.rank import outputs

    assert outputs.summary_line(1.234, 3, 4 << 20, 1 << 20, "residual-int4") == (
        "done: 3 requests in 1.23 s; compression residual-int4: sent 1.00 MB of 4.00 MB, saved 3.00 MB (75.0%), "
        "ratio 4.00x")
    assert outputs.summary_line(0.5, 1, 0, 0, "none") == "done: 1 request in 0.50 s; compression none (no bytes saved)"
