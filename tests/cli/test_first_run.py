"""What a new user sees: the README's main command, quiet output, native sizes, honest stats.

The README command is read from README.md and run for real (2 CPU ranks); the other properties are
checked in-process where they can be, and by one short launch each where they need ranks.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys

import pytest
import torch

from compactfusion_xdit.cli import dry_run
from compactfusion_xdit.models import registry
from compactfusion_xdit.rank import outputs, traffic
from compactfusion_xdit.testing.ranks import run_ranks

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HERE = os.path.abspath(__file__)
LAUNCH = 300  # seconds: one two-rank run including each rank's xfuser import
MAX_LINES = 10


def readme_main_command() -> list[str]:
    """The flags of the ``xfuser`` command in README.md's Set-up block."""
    with open(os.path.join(REPO, "README.md")) as f:
        text = f.read()
    setup = text[text.index("## Set-up"):]
    line = next(l for l in setup.splitlines() if "xfuser --model" in l)
    return shlex.split(line[line.index("xfuser --model") + len("xfuser"):])


def launch(argv: list[str], cwd: str) -> subprocess.CompletedProcess:
    """``xfuser`` (this checkout's launcher) run as a user would, without OMP_NUM_THREADS set."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "LOG_LEVEL", "TRANSFORMERS_VERBOSITY")}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "compactfusion_xdit.cli.launcher", *argv], cwd=cwd, env=env,
                          capture_output=True, timeout=LAUNCH)  # bytes: text mode would turn tqdm's \r into lines
    return subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode(errors="replace"),
                                       proc.stderr.decode(errors="replace"))


def printed_lines(proc: subprocess.CompletedProcess) -> list[str]:
    """Every line a terminal would keep (a progress bar redrawn with \\r is one line)."""
    return (proc.stdout + proc.stderr).rstrip("\n").split("\n")


# --------------------------------------------------------------------------------------------
# The README command, for real
# --------------------------------------------------------------------------------------------


def test_readme_main_command_draws_the_digit_in_at_most_ten_lines(tmp_path):
    argv = readme_main_command()
    assert argv[argv.index("--model") + 1] == "digits-flux" and "--compression-stats" in argv
    proc = launch(argv, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = printed_lines(proc)
    assert len(lines) <= MAX_LINES, "\n".join(lines)
    assert sum("denoising" in l for l in lines) == 1  # one bar: rank 0's
    summary = [l for l in lines if l.startswith("done: ")]
    assert len(summary) == 1 and "-> out/image_0.png" in summary[0] and "ratio" in summary[0], lines
    assert not any(re.search(r"\b(DEBUG|INFO|WARNING)\b|Warning:", l) for l in lines), lines

    from PIL import Image

    with Image.open(tmp_path / "out" / "image_0.png") as image:
        assert image.size == (16, 16)  # digits-flux's own size, not xfuser's 1024x1024
        assert image.convert("L").getextrema()[0] < 100  # ink on the paper, not a blank page
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["ratio"] > 1 and 0 < stats["sent_bytes"] < stats["raw_bytes"]
    assert (stats["height"], stats["width"], stats["num_inference_steps"]) == (16, 16, 20)


# --------------------------------------------------------------------------------------------
# Native settings of the built-ins
# --------------------------------------------------------------------------------------------


def settings(argv: list[str]):
    """The launcher's view of the command line (``--dry-run`` prints it); the ranks apply the same
    `cli.flags.apply_native_settings` to xfuser's parser."""
    return dry_run.settings(argv)


def test_a_builtin_runs_at_its_own_size_and_steps_unless_the_flags_are_given():
    ns = settings(["--model", "digits-flux", "--prompt", "digit 7"])
    assert (ns.height, ns.width, ns.num_inference_steps, ns.max_sequence_length) == (16, 16, 20, 16)
    ns = settings(["--model", "tiny-flux"])
    assert (ns.height, ns.width, ns.num_inference_steps) == (64, 64, 8)
    ns = settings(["--model", "digits-flux", "--height", "32", "--num-inference-steps=5"])
    assert (ns.height, ns.width, ns.num_inference_steps) == (32, 16, 5)  # given flags win, either spelling


def test_a_local_folder_keeps_xfusers_defaults(tmp_path):
    ns = settings(["--model", str(tmp_path)])
    assert (ns.height, ns.width, ns.num_inference_steps) == (1024, 1024, 20)


def test_every_builtin_has_native_settings():
    assert set(registry.NATIVE_SETTINGS) == set(registry.BUILTIN_MODELS)


# --------------------------------------------------------------------------------------------
# Summary, verdict and size helpers
# --------------------------------------------------------------------------------------------


def test_summary_names_the_image_not_stats_json():
    line = outputs.summary_line(1.5, 1, 4 << 20, 1 << 20, "residual-int4", ["out/image_0.png", "out/stats.json"])
    assert line.startswith("done: 1 request in 1.50 s -> out/image_0.png; compression residual-int4: sent 1.00 MB")
    assert outputs.summary_line(0.5, 1, 2048, 2048, "none").endswith("compression none: sent 2.00 KB uncompressed, "
                                                                      "ratio 1.00x")


def test_check_verdict_is_one_line_with_the_mismatch_count():
    assert traffic.check_verdict({"cache_consistent": True, "cache_mismatches": 0}).startswith("cache check: consistent")
    assert "DIVERGED (3 mismatches" in traffic.check_verdict({"cache_consistent": False, "cache_mismatches": 3})


def test_produced_size_reads_images_and_frames():
    from PIL import Image
    import numpy as np

    assert outputs.produced_size([Image.new("RGB", (48, 32))]) == (32, 48)
    assert outputs.produced_size(np.zeros((1, 5, 24, 40, 3), dtype=np.float32)) == (24, 40)
    assert outputs.produced_size(torch.zeros(1, 64, 16)) is None  # packed latents: no pixel size


# --------------------------------------------------------------------------------------------
# --compression none counts its bytes and stays stock
# --------------------------------------------------------------------------------------------


def none_stock_then_counting(rank: int, world_size: int, argv: list[str]):
    """Load once; run with no session (stock), then with the counting-only session of `none`."""
    from compactfusion_xdit import patches
    from compactfusion_xdit.core.config import CompressionConfig
    from compactfusion_xdit.rank import worker

    args = worker.parse_args(argv)
    loaded = worker.load_pipeline(args)  # the worker installs the counting session
    none = CompressionConfig.parse("none")
    patches.install(none)
    assert patches.session() is None
    stock = worker.call_pipeline(loaded, args)
    patches.install(none, count=True)
    session = patches.session()
    session.begin_request(reset_stats=True)
    counted = worker.call_pipeline(loaded, args)
    if rank != world_size - 1:  # xfuser returns the output on the last rank
        return None, None, session.stats()
    return stock.images.float(), counted.images.float(), session.stats()


def test_compression_none_counts_raw_bytes_and_is_bitwise_stock():
    argv = ["--model", "tiny-flux", "--num_inference_steps", "2", "--prompt", "a cat", "--max_sequence_length", "16",
            "--output_type", "latent", "--ulysses_degree", "2", "--compression", "none"]
    per_rank = run_ranks(f"{HERE}:none_stock_then_counting", 2, {"argv": argv}, timeout=LAUNCH,
                         init_process_group=False)
    stock, counted, _ = per_rank[-1]
    assert torch.equal(stock, counted)
    for _, _, stats in per_rank:
        ulysses = stats["paths"]["ulysses"]
        assert ulysses["raw_bytes"] == ulysses["sent_bytes"] > 0 and stats["raw_bytes"] == stats["sent_bytes"]


@pytest.mark.slow
def test_compression_none_stats_show_the_exchange_cost_and_the_size_made(tmp_path):
    proc = launch(["--model", "tiny-flux", "--ulysses_degree", "2", "--num_inference_steps", "2", "--height", "66",
                   "--max_sequence_length", "16", "--prompt", "a cat", "--compression", "none"], cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["raw_bytes"] == stats["sent_bytes"] > 0 and stats["ratio"] == 1.0
    # tiny-flux draws multiples of 4 (VAE factor 2 x Flux's 2x2 packing): 66 becomes 64
    assert (stats["height"], stats["width"], stats["requested_height"]) == (64, 64, 66)
    from PIL import Image

    with Image.open(tmp_path / "out" / "image_0.png") as image:
        assert image.size == (64, 64)


@pytest.mark.slow
def test_compression_check_prints_its_verdict_once(tmp_path):
    proc = launch(["--model", "tiny-flux", "--ulysses_degree", "2", "--num_inference_steps", "3",
                   "--max_sequence_length", "16", "--prompt", "a cat", "--compression", "residual-int4",
                   "--compression-check"], cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    verdicts = [l for l in printed_lines(proc) if l.startswith("cache check: ")]
    assert verdicts == ["cache check: consistent (every receiver cache bitwise equal to its sender's)"]
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["cache_mismatches"] == 0
