"""The first minutes with the ``xfuser`` command: usage errors and ``--help`` answered before torch,
diffusers or xfuser is imported (nothing built), ``--dry-run``'s status for a missing model, and a
rank's usage error shown as its one line instead of torchrun's report.

No wall-clock assertions: what makes these answers fast is that the heavy modules are never imported,
and that is what the tests check (`sys.modules` after the command ran).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from compactfusion_xdit.cli import dry_run, flag_table, launcher, torchrun
from compactfusion_xdit.models import registry

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUICK = 120  # seconds: the bound for a subprocess that must not get far
LAUNCH = 300  # seconds: two ranks importing xfuser on a busy machine
HEAVY = ("torch", "diffusers", "transformers", "xfuser")
LAUNCHER = [sys.executable, "-m", "compactfusion_xdit.cli.launcher"]  # this checkout's, not a console script's

#: Runs the launcher in-process, then prints which heavy modules it imported (last stdout line).
PROBE = ("import sys; from compactfusion_xdit.cli import launcher; rc = launcher.main(sys.argv[1:]); "
         f"print('imported:', ','.join(m for m in {HEAVY!r} if m in sys.modules) or 'none'); sys.exit(rc)")


def env(**extra: str) -> dict[str, str]:
    out = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    out.pop("CFX_DEBUG", None)
    return {**out, **extra}


def probe(argv: list[str], cache: str) -> tuple[int, list[str], str]:
    """(exit status, stdout lines before the probe's, stderr) of the launcher run in a fresh process
    with an empty model cache; asserts that nothing heavy was imported and nothing was built."""
    proc = subprocess.run([sys.executable, "-c", PROBE, *argv], cwd=REPO, env=env(CFX_CACHE=cache),
                          capture_output=True, text=True, timeout=QUICK)
    *out, last = proc.stdout.splitlines() or [""]
    assert last == "imported: none", (argv, proc.stdout[-2000:], proc.stderr[-2000:])
    assert not os.listdir(cache), os.listdir(cache)  # no built-in model was built for this answer
    return proc.returncode, out, proc.stderr


@pytest.fixture
def empty_cache(tmp_path) -> str:
    path = tmp_path / "cache"
    path.mkdir()
    return str(path)


# --------------------------------------------------------------------------------------------
# Usage errors and --help: nothing heavy imported, nothing built
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flags, message", [
    (["--model", "tiny-flux", "--use_cfg_parallel"],
     "Flux has no classifier-free guidance branch to split; drop --use_cfg_parallel"),
    (["--model", "digits-flux", "--use_cfg_parallel"],
     "Flux has no classifier-free guidance branch to split; drop --use_cfg_parallel"),
    (["--model", "tiny-flux", "--output_type", "np"], "--output_type 'np' is not supported; use pil or latent"),
    (["--model", "tiny-pixart", "--ulysses_degree", "3"],
     "the model has 4 attention heads, not divisible by --ulysses_degree 3; use a Ulysses degree that divides 4 "
     "(move the rest to --ring_degree)"),
    (["--model", "tiny-flux", "--ulysess_degree", "2"], "unrecognized flag --ulysess_degree; did you mean --ulysses_degree?"),
    (["--model", "tiny-flux", "--pipefusion_parallel_degree", "2", "--num_pipeline_patch", "1"],
     "--num_pipeline_patch 1 is smaller than --pipefusion_parallel_degree 2; use at least one patch per stage"),
])
def test_a_refused_launch_imports_nothing_heavy_and_builds_nothing(empty_cache, flags, message):
    code, out, err = probe([*flags, "--prompt", "a cat"], empty_cache)
    assert code == 2 and out == [] and err.splitlines() == [f"xfuser: error: {message}"], err


def test_a_local_folders_config_is_read_without_torch(empty_cache, tmp_path):
    folder = tmp_path / "model"
    (folder / "transformer").mkdir(parents=True)
    (folder / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')
    (folder / "transformer" / "config.json").write_text('{"num_attention_heads": 24}')
    code, _, err = probe(["--model", str(folder), "--ulysses_degree", "5"], empty_cache)
    assert code == 2 and "24 attention heads, not divisible by --ulysses_degree 5" in err


def test_help_comes_from_the_snapshot_without_xfuser(empty_cache):
    code, out, err = probe(["--help"], empty_cache)
    assert code == 0 and err == "" and out[0].startswith("usage: xfuser [-h] --model MODEL")
    text = " ".join(" ".join(out).split())
    for flag in ("--ulysses_degree", "--use_cfg_parallel", "--compression", "--dry-run", "--nproc_per_node"):
        assert flag in text, flag
    assert "Ulysses sequence parallel degree. Used in attention layer." in text  # xfuser's help texts travel


def test_the_snapshot_help_is_xfusers_help():
    from compactfusion_xdit.cli import flags

    assert flag_table.fast_parser(for_help=True).format_help() == flags.build_parser().format_help()


def test_every_built_in_is_in_the_config_table_as_built():
    assert set(registry.BUILTIN_CONFIGS) == set(registry.BUILTIN_MODELS)
    for name, (class_name, config) in registry.BUILTIN_CONFIGS.items():
        path = registry.resolve(name)  # the real model (built once into the cache)
        assert registry.pipeline_class_name(path) == class_name, name
        built = registry.backbone_config(path)
        assert {key: built.get(key) for key in config} == config, name


def test_a_valid_launch_builds_the_model_once_before_torchrun(empty_cache, monkeypatch):
    monkeypatch.setenv("CFX_CACHE", empty_cache)
    started = []

    def fake_run(cmd, env, prog="xfuser"):
        started.append(registry.is_built("tiny-flux"))
        return 0

    monkeypatch.setattr(torchrun, "run_to_completion", fake_run)
    assert launcher.main(["--model", "tiny-flux", "--ulysses_degree", "2", "--prompt", "a cat"]) == 0
    assert started == [True]


# --------------------------------------------------------------------------------------------
# --dry-run: a missing model folder is status 3 after the whole plan
# --------------------------------------------------------------------------------------------


def test_a_dry_run_with_a_missing_model_prints_the_plan_and_exits_3(empty_cache, tmp_path):
    code, out, err = probe(["--model", str(tmp_path / "nope"), "--ulysses_degree", "2", "--dry-run"], empty_cache)
    assert code == dry_run.MODEL_MISSING == 3 and err == ""
    assert out[0] == "xfuser: dry run, nothing launched"
    assert any(line.startswith("  command      ") for line in out)
    assert out[-1].startswith(f"warning: --model '{tmp_path / 'nope'}' is neither a built-in model")


def test_a_dry_run_of_a_built_in_is_status_0_without_building_it(empty_cache):
    code, out, err = probe(["--model", "tiny-sd3", "--use_cfg_parallel", "--dry-run"], empty_cache)
    assert code == 0 and out[1] == "  model        tiny-sd3 (built-in, StableDiffusion3Pipeline)", out


def test_a_refused_dry_run_is_still_status_2(empty_cache, tmp_path):
    code, out, err = probe(["--model", str(tmp_path / "nope"), "--ulysses_degree", "0", "--dry-run"], empty_cache)
    assert code == 2 and out == [] and err.splitlines() == ["xfuser: error: --ulysses_degree 0 must be at least 1"]


# --------------------------------------------------------------------------------------------
# A failure inside the ranks: their one-line errors, not torchrun's report
# --------------------------------------------------------------------------------------------

RANK_SCRIPT = """\
import os, signal, sys, time
rank = os.environ["RANK"]
mode = sys.argv[1]
os.write(1, f"rank {rank} says hello\\n".encode())  # one write each: the ranks share the pipes
os.write(2, b"\\rstep 1/2")
if mode == "usage":  # both ranks refuse the same setting, once both run
    here = os.path.dirname(os.path.abspath(__file__))
    open(os.path.join(here, "started" + rank), "w").close()
    while not all(os.path.exists(os.path.join(here, "started" + r)) for r in "01"):
        time.sleep(0.01)
    os.write(2, b"error: --frobnicate 3 is not allowed; use 2\\n")
    sys.exit(2)
if mode == "killed" and rank == "1":
    os.kill(os.getpid(), signal.SIGKILL)
if mode == "ok":
    os.write(2, b"\\rstep 2/2\\n")
    sys.exit(0)
time.sleep(600)
"""


def run_fake_ranks(tmp_path, mode: str, **extra_env: str) -> subprocess.CompletedProcess:
    """`run_to_completion` on real torchrun with two light ranks (no torch in them)."""
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    code = ("import sys; from compactfusion_xdit.cli import plan, ports, torchrun; "
            "launch = plan.LaunchPlan(2, 2, 1, 0, '127.0.0.1', ports.free_port()); "
            "sys.exit(torchrun.run_to_completion(torchrun.torchrun_command(launch, sys.argv[2:], "
            "target=(sys.argv[1],)), torchrun.launch_env(False)))")
    return subprocess.run([sys.executable, "-c", code, str(script), mode], cwd=REPO, env=env(**extra_env),
                          capture_output=True, text=True, timeout=QUICK)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.replace("\r", "\n").splitlines() if "error" in line.lower()]


def test_ranks_usage_errors_are_one_line_each_distinct_and_status_2(tmp_path):
    proc = run_fake_ranks(tmp_path, "usage")
    assert proc.returncode == 2, proc.stderr
    assert error_lines(proc.stderr) == ["xfuser: error: --frobnicate 3 is not allowed; use 2"], proc.stderr
    assert "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr
    assert "step 1/2" in proc.stderr  # the ranks' own stderr still reaches the user
    assert sorted(proc.stdout.splitlines()) == ["rank 0 says hello", "rank 1 says hello"]  # stdout untouched


def test_a_rank_that_dies_silently_is_named_in_one_line(tmp_path):
    proc = run_fake_ranks(tmp_path, "killed")
    assert proc.returncode not in (0, 2), proc.stderr
    assert error_lines(proc.stderr) == ["xfuser: error: rank 1 was killed by SIGKILL without an error message; "
                                        "set CFX_DEBUG=1 for torchrun's report"], proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_successful_launch_passes_the_ranks_output_through(tmp_path):
    proc = run_fake_ranks(tmp_path, "ok")
    assert proc.returncode == 0, proc.stderr
    assert "step 2/2" in proc.stderr and "error" not in proc.stderr.lower()


def test_cfx_debug_shows_torchruns_report(tmp_path):
    proc = run_fake_ranks(tmp_path, "usage", CFX_DEBUG="1")
    assert proc.returncode != 0 and "ChildFailedError" in proc.stderr


def test_the_error_filter_keeps_output_and_drops_repeats():
    lines = torchrun._ErrorLines("xfuser")
    assert lines.filter(b"loading 50%") == b"loading 50%"
    assert lines.filter(b"error: bad") == b"xfuser: error: bad"
    assert lines.filter(b"error: bad") is None
    assert lines.filter(b"cfx-xdit: error: bad") == b"cfx-xdit: error: bad"
    assert lines.filter(b"error (rank 1): RuntimeError: x") == b"xfuser: error (rank 1): RuntimeError: x"
    assert lines.filter(b"RuntimeError: not a rank's error line") == b"RuntimeError: not a rank's error line"
    # another rank's progress bar left a partial line in the pipe: the error line still stands alone
    assert torchrun._split_error(b"\rstep 1/2\rstep 1/2error: bad") == (b"\rstep 1/2\rstep 1/2", b"error: bad")
    assert torchrun._split_error(b"\r 50%xfuser: error: bad") == (b"\r 50%", b"xfuser: error: bad")
    assert torchrun._split_error(b"log line: error: x") == (b"", b"log line: error: x")


@pytest.mark.slow  # a real worker launch; the fake-rank tests above cover the mechanism in CI
def test_a_usage_error_only_a_rank_can_see_reaches_the_user_as_one_line(empty_cache, tmp_path):
    """End to end with the real worker: ``CFX_COMM_TIMEOUT_S`` is read by the ranks only."""
    proc = subprocess.run([*LAUNCHER, "--model", "tiny-flux", "--ulysses_degree", "2", "--height", "32", "--width", "32",
                           "--num_inference_steps", "1", "--max_sequence_length", "16", "--prompt", "a cat",
                           "--output_dir", str(tmp_path / "out")], cwd=REPO,
                          env=env(CFX_CACHE=empty_cache, CFX_COMM_TIMEOUT_S="soon"), capture_output=True, text=True,
                          timeout=LAUNCH)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("xfuser: error")]
    assert errors == ["xfuser: error: CFX_COMM_TIMEOUT_S='soon' must be a number of seconds > 0 (default 600)"], proc.stderr
    assert "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr
