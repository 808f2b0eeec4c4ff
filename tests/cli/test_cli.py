"""The ``xfuser`` command: flags, cheap checks before any rank starts, and one end-to-end launch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from compactfusion_xdit.cli import plan, torchrun
from compactfusion_xdit.testing.targets import xfuser_command

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUICK = 120  # seconds: the subprocess bound for checks that must not reach xfuser or torchrun
LAUNCH = 300  # seconds: one two-rank run including each rank's xfuser import


def run_xfuser(argv: list[str], cache: str, timeout: float = QUICK) -> subprocess.CompletedProcess:
    env = {**os.environ, "CFX_CACHE": cache, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*xfuser_command(), *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def launcher_error(argv: list[str], cache: str) -> str:
    """Run the launcher in a process that reports whether xfuser got imported; return its one error line."""
    code = ("import sys; from compactfusion_xdit.cli import launcher, plan, torchrun; rc = launcher.main(sys.argv[1:]); "
            "print('xfuser imported' if 'xfuser' in sys.modules else 'xfuser not imported'); sys.exit(rc)")
    env = {**os.environ, "CFX_CACHE": cache, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code, *argv], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=QUICK)
    assert proc.returncode == 2
    assert proc.stdout.strip() == "xfuser not imported"
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("xfuser: error: "), proc.stderr
    return lines[0]


# --------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, before xfuser is imported
# --------------------------------------------------------------------------------------------


def test_a_mistyped_flag_is_refused_with_the_closest_flag(model_cache):
    line = launcher_error(["--model", "tiny-flux", "--ulysses_degree", "2", "--compresion", "residual-int4"], model_cache)
    assert line == "xfuser: error: unrecognized flag --compresion; did you mean --compression?"


@pytest.mark.parametrize("flags, message", [
    (["--use_cfg_parallel"], "Flux has no classifier-free guidance branch to split; drop --use_cfg_parallel"),
    (["--output_type", "np"], "--output_type 'np' is not supported; use pil or latent"),
    (["--pipefusion_parallel_degree", "2", "--num_pipeline_patch", "1"],
     "--num_pipeline_patch 1 is smaller than --pipefusion_parallel_degree 2; use at least one patch per stage"),
])
def test_the_ranks_usage_errors_are_caught_before_torchrun(model_cache, flags, message):
    line = launcher_error(["--model", "tiny-flux", *flags], model_cache)
    assert line == f"xfuser: error: {message}"


def test_pipefusion_without_a_patch_count_takes_one_patch_per_stage_as_xdit_does(model_cache):
    ns = plan.preparse(["--model", "tiny-flux", "--pipefusion_parallel_degree", "2"])
    from compactfusion_xdit.cli import checks, dry_run

    full = dry_run.settings(["--model", "tiny-flux", "--pipefusion_parallel_degree", "2"])
    assert checks.parallel_settings(full)["num_pipeline_patch"] == 2  # xfuser's ParallelConfig default: the degree
    assert plan.plan_launch(ns, settings=full).world_size == 2


def test_version_answers_without_xfuser(model_cache):
    proc = run_xfuser(["--version"], model_cache)
    assert proc.returncode == 0 and proc.stdout.startswith("xfuser (compactfusion-xdit 0.1.0) on xfuser 0.7.0")


def test_unknown_model_names_the_builtins(model_cache):
    line = launcher_error(["--model", "no/such-model", "--ulysses_degree", "2"], model_cache)
    from compactfusion_xdit.models import tiny

    assert "'no/such-model' is neither a built-in model (" in line
    assert all(name in line for name in ("tiny-flux", "tiny-pixart", "tiny-sd3", *tiny.BUILTIN_MODELS))


def test_folder_without_model_index_is_refused(model_cache, tmp_path):
    line = launcher_error(["--model", str(tmp_path)], model_cache)
    assert "has no model_index.json" in line


def test_degrees_that_do_not_match_the_rank_count(model_cache):
    line = launcher_error(["--model", "tiny-flux", "--ulysses_degree", "2", "--ring-degree", "2",
                           "--nproc_per_node", "2"], model_cache)
    assert "multiply to 4" in line and "gives 2 ranks" in line


def test_zero_degree_is_refused(model_cache):
    assert "--ring_degree 0 must be at least 1" in launcher_error(["--model", "tiny-flux", "--ring_degree", "0"], model_cache)


def test_heads_not_divisible_by_ulysses_degree(model_cache):
    line = launcher_error(["--model", "tiny-flux", "--ulysses_degree", "3"], model_cache)
    assert "4 attention heads, not divisible by --ulysses_degree 3" in line


def test_fp8_comms_with_compression_is_refused(model_cache):
    line = launcher_error(["--model", "tiny-flux", "--ulysses_degree", "2", "--use_fp8_comms",
                           "--compression", "residual-int4"], model_cache)
    assert "--use_fp8_comms and --compression residual-int4" in line


def test_unknown_codec_lists_the_valid_names(model_cache):
    line = launcher_error(["--model", "tiny-flux", "--compression", "residual-int3"], model_cache)
    assert "argument --compression: unknown compression 'residual-int3'" in line and "residual-int4" in line


def test_no_ef_with_plain_compression_is_refused(model_cache):
    line = launcher_error(["--model", "tiny-flux", "--compression", "int4", "--compression-no-ef"], model_cache)
    assert "--compression-no-ef only applies to residual compression" in line


# --------------------------------------------------------------------------------------------
# Parsing and placement (in process, no xfuser)
# --------------------------------------------------------------------------------------------


def test_world_size_is_the_product_of_the_degrees_like_xdit():
    ns = plan.preparse(["--ulysses_degree", "2", "--ring-degree=2", "--pipefusion_parallel_degree", "2",
                       "--use_cfg_parallel", "--data-parallel-degree", "1"])
    assert plan.world_size(ns) == 16


def test_our_flags_take_dashes_or_underscores():
    ns = plan.preparse(["--compression=residual-int4", "--compression_warmup", "3", "--compression-paths", "ulysses,ring",
                       "--compression-no-ef", "--compression_check", "--compression-stats", "--output-dir", "o"])
    assert (ns.compression, ns.compression_warmup, ns.compression_paths) == ("residual-int4", 3, "ulysses,ring")
    assert ns.compression_no_ef and ns.compression_check and ns.compression_stats and ns.output_dir == "o"
    config = plan.cli_args.compression_config(ns)
    assert (config.name, config.warmup, config.paths, config.check) == ("residual-int4-noef", 3, ("ulysses", "ring"), True)


def test_multi_node_placement_goes_to_torchrun(model_cache, monkeypatch):
    monkeypatch.setenv("CFX_CACHE", model_cache)
    ns = plan.preparse(["--model", "tiny-flux", "--ulysses_degree", "4", "--nnodes", "2", "--node_rank", "1",
                       "--master_addr", "10.0.0.1"])
    launch = plan.plan_launch(ns)
    assert (launch.world_size, launch.nproc_per_node, launch.master_port) == (4, 2, plan.DEFAULT_MULTINODE_PORT)
    cmd = torchrun.torchrun_command(launch, ["--model", "tiny-flux"])
    assert cmd[1:] == ["-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=2", "--node_rank=1",
                       "--master_addr=10.0.0.1", f"--master_port={plan.DEFAULT_MULTINODE_PORT}",
                       "-m", "compactfusion_xdit.rank.worker", "--model", "tiny-flux"]


def test_dtype_choices_are_the_workers():
    from compactfusion_xdit.rank import worker

    assert set(plan.cli_args.DTYPE_NAMES) == set(worker.DTYPES)


def test_cpu_ranks_get_one_thread_unless_the_user_chose(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert torchrun.launch_env(cuda=False)["OMP_NUM_THREADS"] == "1"
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert torchrun.launch_env(cuda=False)["OMP_NUM_THREADS"] == "3"


# --------------------------------------------------------------------------------------------
# The command itself (imports xfuser / launches ranks)
# --------------------------------------------------------------------------------------------


def test_help_lists_xfusers_flags_and_ours(model_cache):
    proc = run_xfuser(["--help"], model_cache)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for flag in ("--ulysses_degree", "--ring_degree", "--pipefusion_parallel_degree", "--use_cfg_parallel", "--model",
                 "--compression", "--compression-warmup", "--compression-paths", "--compression-no-ef",
                 "--compression-check", "--compression-stats", "--output_dir", "--dtype", "--nproc_per_node",
                 "--nnodes", "--node_rank", "--master_addr", "--master_port"):
        assert flag in proc.stdout, flag


@pytest.mark.slow  # CI time; tests/cli/test_first_run.py runs the README command, which writes both
def test_two_rank_ulysses_run_writes_the_image_and_stats(model_cache, tmp_path):
    from PIL import Image

    out = tmp_path / "out"
    proc = run_xfuser(["--model", "tiny-flux", "--ulysses_degree", "2", "--height", "64", "--width", "64",
                       "--num_inference_steps", "2", "--max_sequence_length", "16", "--prompt", "a cat",
                       "--compression-warmup", "2", "--output-dir", str(out)], model_cache, timeout=LAUNCH)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with Image.open(out / "image_0.png") as image:
        assert image.size == (64, 64)
    stats = json.loads((out / "stats.json").read_text())
    assert stats["world_size"] == 2 and stats["parallel"]["ulysses"] == 2 and stats["compression"] == "none"
    assert stats["outputs"] == ["image_0.png"]
    assert stats["compression_config"]["warmup"] == 2  # dashed spellings reach the ranks' parser


def test_one_failing_rank_stops_the_launch_with_a_non_zero_status(tmp_path):
    # Rank 1 fails at once while rank 0 would wait forever (as for a peer in a collective).
    script = tmp_path / "rank.py"
    script.write_text("import os, sys, time\n"
                      "if os.environ['RANK'] == '1':\n    sys.exit(3)\n"
                      "time.sleep(600)\n")
    code = ("import sys; from compactfusion_xdit.cli import plan, ports, torchrun; "
            "launch = plan.LaunchPlan(2, 2, 1, 0, '127.0.0.1', ports.free_port()); "
            "sys.exit(torchrun.run_to_completion(torchrun.torchrun_command(launch, [], target=(sys.argv[1],)), torchrun.launch_env(False)))")
    proc = subprocess.run([sys.executable, "-c", code, str(script)], cwd=REPO, capture_output=True, text=True,
                          timeout=QUICK)
    assert proc.returncode == 1, proc.stderr  # torchrun's status for a failed child (2 is kept for usage errors)
    # the failed rank said nothing: one line names it, instead of torchrun's traceback and report
    assert "xfuser: error: rank 1 exited with status 3 without an error message" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
