"""Every script in scripts/ runs: one tiny real run each (in a subprocess, one thread, a hard timeout),
checked for the properties its output must have. ``--help`` only where a real run needs what a test
machine may lack (bench_network: root and network namespaces; its real run is marked slow)."""

from __future__ import annotations

import ast
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPTS = os.path.join(ROOT, "scripts")
RESIDUAL_CODECS = ("int8", "int4", "int2", "1bit", "lowrank-8")


def run_script(name: str, *args: str, timeout: float = 60, expect: int = 0) -> subprocess.CompletedProcess:
    """`scripts/<name> args` in a fresh interpreter, one thread, exiting `expect`; the failure message
    carries its output."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.pop("PYTHONPATH", None)  # the installed package, not the checkout's folder on sys.path
    proc = subprocess.run([sys.executable, os.path.join(SCRIPTS, name), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)
    assert proc.returncode == expect, f"{name} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _script_names() -> list[str]:
    return sorted(n for n in os.listdir(SCRIPTS) if n.endswith(".py"))


# ------------------------------------------------------------------------------------------------
# How scripts import
# ------------------------------------------------------------------------------------------------


#: Scripts whose job includes running test files (as a pytest subprocess) on a machine CI lacks.
RUNS_THE_TESTS = {"gpu_check.py"}


@pytest.mark.parametrize("name", _script_names())
def test_script_imports_the_package_only(name):
    """No sys.path edits and nothing from tests/: a script works from any folder with the package installed."""
    with open(os.path.join(SCRIPTS, name)) as f:
        tree = ast.parse(f.read(), name)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr == "path" and getattr(node.value, "id", None) == "sys":
            pytest.fail(f"{name}:{node.lineno} touches sys.path")
        if isinstance(node, ast.Import):
            modules = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            modules = [node.module or ""]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if name in RUNS_THE_TESTS:  # it runs test files with pytest; it still imports nothing from them
                continue
            assert not node.value.startswith(("tests/", "tests" + os.sep)), f"{name}:{node.lineno} names {node.value!r}"
            continue
        else:
            continue
        for module in modules:
            assert module.split(".")[0] not in ("tests", "test", "_fused_reference", "_fused_checks"), \
                f"{name}:{node.lineno} imports {module}"


def test_every_script_has_a_smoke_test_here():
    with open(__file__) as f:
        source = f.read()
    for name in _script_names():
        assert f'run_script("{name}"' in source, f"scripts/{name} has no smoke run in {os.path.basename(__file__)}"


# ------------------------------------------------------------------------------------------------
# bench_codec
# ------------------------------------------------------------------------------------------------


def test_bench_exchange_times_the_layer_over_gloo_and_in_loopback(tmp_path):
    out = tmp_path / "exchange.json"
    proc = run_script("bench_exchange.py", "--compressions", "none,residual-int4", "--layers", "2", "--steps", "4",
                      "--out", str(out), timeout=120)
    rows = {r["compression"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["none"]["cpu_overhead_us"] == 0 and rows["residual-int4"]["wall_us_per_layer"] > 0
    assert "residual-int4" in proc.stdout
    run_script("bench_exchange.py", "--loopback", "--ranks", "4", "--repeats", "1", "--layers", "2", "--steps", "4",
               "--out", str(out))
    rows = {r["compression"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"none", "residual-int4", "residual-1bit"} and rows["residual-1bit"]["us_per_layer"] > 0


def test_bench_codec_times_every_codec_and_reports_ratios(tmp_path):
    out = tmp_path / "codec.json"
    proc = run_script("bench_codec.py", "--quick", "--path", "torch", "--json", str(out))
    result = json.loads(out.read_text())
    assert result["device"] == "cpu" and result["timer"] == "perf_counter" and result["copy_GBps"] is None
    rows = result["rows"]
    assert {r["codec"] for r in rows} == {"none", *RESIDUAL_CODECS}
    for r in rows:
        assert r["path"] == "torch" and r["encode_us"] > 0 and r["decode_us"] > 0
        assert math.isfinite(r["encode_GBps"]) and r["encode_GBps"] > 0
        assert r["raw_bytes"] == r["N"] * r["C"] * 2 and r["ratio_vs_dtype"] == r["raw_bytes"] / r["payload_bytes"]
        assert "encode_graph_us" not in r  # CUDA only
    ratio = {(r["codec"], r["mode"]): r["ratio_vs_fp16"] for r in rows}
    assert ratio[("none", "plain")] == 1.0
    assert all(ratio[(c, "residual")] > 1.0 for c in RESIDUAL_CODECS)
    # each step down in bits sends fewer bytes (per-token scales keep it under the bit-width ratio)
    assert 1.5 < ratio[("int8", "residual")] < ratio[("int4", "residual")] < ratio[("int2", "residual")] \
        < ratio[("1bit", "residual")]
    assert "int4 residual" in " ".join(proc.stdout.split())


# ------------------------------------------------------------------------------------------------
# bench_fidelity --path
# ------------------------------------------------------------------------------------------------


def _path_table(tmp_path, method: str, *extra: str, timeout: float = 90) -> dict:
    run_script("bench_fidelity.py", "--path", method, "--quick", "--out", str(tmp_path), *extra, timeout=timeout)
    result = json.loads((tmp_path / f"bench_fidelity_{method}.json").read_text())
    table = (tmp_path / f"bench_fidelity_{method}.md").read_text()
    assert result["path"] == method and result["ranks"] == 2 and result["output"] == "latent"
    for row in result["rows"]:
        assert f"| {row['codec']} |" in table
    return {r["codec"]: r for r in result["rows"]}


def _coded_row_is_sensible(row: dict, min_ratio: float, min_db: float) -> None:
    assert row["raw_bytes"] > row["sent_bytes"] > 0 and row["ratio"] > min_ratio
    for ref in ("vs_single", "vs_uncompressed"):
        if ref in row:
            assert row[ref]["compared"] == 1 and row[ref]["identical"] == 0
            assert math.isfinite(row[ref]["psnr_db"]) and row[ref]["psnr_db"] > min_db


@pytest.mark.slow  # CI time: a minute of runs; the fidelity paths are tested in tests/paths
def test_bench_fidelity_ulysses_table_scores_against_one_process_and_uncompressed(tmp_path):
    rows = _path_table(tmp_path, "ulysses")
    assert list(rows) == ["none", "residual-int4", "int4"]
    none = rows["none"]
    assert none["vs_uncompressed"]["identical"] == 1 and none["vs_uncompressed"]["max_abs_diff"] == 0.0
    # Ulysses without compression is the single-process result up to float summation order
    assert none["vs_single"]["psnr_db"] > 120
    # uncompressed runs count what they send: the same messages as the coded runs, all raw
    assert none["raw_bytes"] == none["sent_bytes"] == rows["int4"]["raw_bytes"] > 0
    _coded_row_is_sensible(rows["residual-int4"], min_ratio=2.0, min_db=85)  # measured 2.72x, 96 dB
    _coded_row_is_sensible(rows["int4"], min_ratio=2.0, min_db=70)  # measured 81 dB
    # same tensors, same payload sizes; coding the residual loses less than coding x itself
    assert rows["int4"]["raw_bytes"] == rows["residual-int4"]["raw_bytes"]
    assert rows["int4"]["sent_bytes"] == rows["residual-int4"]["sent_bytes"]
    assert rows["residual-int4"]["vs_uncompressed"]["psnr_db"] > rows["int4"]["vs_uncompressed"]["psnr_db"] + 5


@pytest.mark.slow
def test_bench_fidelity_ring_table_counts_ring_bytes_and_checks_caches(tmp_path):
    rows = _path_table(tmp_path, "ring", "--against", "uncompressed", "--check", "--only-path")
    _coded_row_is_sensible(rows["residual-int4"], min_ratio=1.5, min_db=60)
    assert rows["residual-int4"]["cache_consistent"] is True


@pytest.mark.slow
def test_bench_fidelity_pipefusion_table(tmp_path):
    rows = _path_table(tmp_path, "pipefusion", "--against", "uncompressed")
    _coded_row_is_sensible(rows["residual-int4"], min_ratio=1.5, min_db=60)  # measured 1.71x, 67 dB
    assert rows["residual-int4"]["vs_uncompressed"]["psnr_db"] > rows["int4"]["vs_uncompressed"]["psnr_db"]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["patch", "displaced"])
def test_bench_fidelity_patch_parallel_tables(tmp_path, method):
    rows = _path_table(tmp_path, method, timeout=150)
    _coded_row_is_sensible(rows["residual-int4"], min_ratio=1.5, min_db=60)


@pytest.mark.slow
def test_bench_fidelity_step_table_with_an_extra_worker_flag(tmp_path):
    rows = _path_table(tmp_path, "step", "--against", "uncompressed", "--steps", "8",
                       "--extra=--step_parallel_warmup 1")
    assert rows["residual-int4"]["raw_bytes"] > 0
    _coded_row_is_sensible(rows["residual-int4"], min_ratio=1.2, min_db=40)


@pytest.mark.slow
def test_bench_fidelity_image_table_quick(tmp_path):
    run_script("bench_fidelity.py", "--quick", "--out", str(tmp_path), timeout=150)
    rows = {r["codec"]: r for r in json.loads((tmp_path / "bench_fidelity.json").read_text())["rows"]}
    assert set(rows) == {"none", "residual-int4", "int4"}
    assert all(0.0 < r["ssim"] <= 1.0 and r["psnr_db"] > 20 for r in rows.values())
    assert rows["residual-int4"]["raw_bytes"] > rows["residual-int4"]["sent_bytes"]


# ------------------------------------------------------------------------------------------------
# The other scripts
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow  # CI time (~17 s)
def test_kv_codec_fidelity_codes_every_kv_and_stays_close(tmp_path):
    out = tmp_path / "kv.json"
    run_script("kv_codec_fidelity.py", "--model", "tiny-flux", "--size", "32", "--steps", "3", "--prompts", "a cat",
               "--names", "residual-int4", "int4", "--json", str(out))
    result = json.loads(out.read_text())["results"]
    for name in ("residual-int4", "int4"):  # measured 68 and 72 dB (3 steps, so little to feed back)
        value = result[name]["psnr_db_mean"]
        assert math.isfinite(value) and 50 < value < 200 and result[name]["psnr_db_min"] == value


def test_project_gpu_projects_from_the_recorded_figures(tmp_path):
    run_script("project_gpu.py", "--out", str(tmp_path))
    result = json.loads((tmp_path / "project_gpu.json").read_text())
    assert "PROJECTION" in result["label"] and result["rows"]
    assert all(r["speedup_vs_none"] > 0 and math.isfinite(r["speedup_vs_none"]) for r in result["rows"])
    # the codec figures still come from the fused benchmark's recorded file
    assert "bench_fused_h100.json" in result["figures"]["codec"]["source"]


@pytest.mark.slow  # CI time (~10 s)
def test_train_tiny_model_trains_a_few_steps_and_saves_a_loadable_folder(tmp_path):
    out = tmp_path / "model"
    run_script("train_tiny_model.py", "--out", str(out), "--steps", "3", "--batch-size", "4", "--double-blocks", "1",
               "--single-blocks", "1", "--heads", "2", "--head-dim", "8", "--max-text-tokens", "4",
               "--warmup-steps", "1", "--log-every", "1", "--save-dtype", "float32")
    config = json.loads((out / "training_config.json").read_text())
    assert config["steps_done"] == 3 and math.isfinite(config["final_loss_last_100"])
    assert config["final_loss_last_100"] > 0
    assert {"model_index.json", "transformer", "vae", "scheduler"} <= set(os.listdir(out))


def load_script(name: str):
    """scripts/`name` as a module (its main() not run)."""
    spec = importlib.util.spec_from_file_location(f"_script_{name[:-3]}", os.path.join(SCRIPTS, name))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_bench_network_help_and_helpers():
    proc = run_script("bench_network.py", "--help")
    assert "--rates" in proc.stdout and "--cleanup" in proc.stdout
    script = load_script("bench_network.py")
    opts = script.parse_options(["--quick"])
    assert (opts.ranks, opts.rates, opts.methods) == (2, "1gbit", "ulysses")
    assert script.parse_options(["--codecs", "none,auto,residual-int4"]).codecs == "none,auto,residual-int4"
    from compactfusion_xdit.benchmarks import netns

    assert netns.parse_rate("1gbit") == 10**9 and netns.parse_rate("unshaped") is None


def test_bench_two_nodes_help_and_run_flags():
    """Its real run needs root and network namespaces (the two-node tests in tests/paths are slow)."""
    proc = run_script("bench_two_nodes.py", "--help")
    assert "--rate" in proc.stdout and "--runs" in proc.stdout
    script = load_script("bench_two_nodes.py")
    assert script.run_flags("none") == ["--compression", "none"]
    assert script.run_flags("residual-int4:inter-node") == ["--compression", "residual-int4", "--compression-scope",
                                                             "inter-node"]


@pytest.mark.slow
def test_bench_network_tiny_unshaped_run(tmp_path):
    from compactfusion_xdit.benchmarks import netns

    reason = netns.unavailable_reason()
    if reason:
        pytest.skip(f"bench_network {reason}")
    run_script("bench_network.py", "--ranks", "2", "--rates", "unshaped", "--methods", "ulysses", "--codecs",
               "none,residual-int4", "--model", "tiny-flux", "--height", "32", "--width", "32", "--steps", "3",
               "--requests", "1", "--out", str(tmp_path), timeout=240)
    rows = {r["codec"]: r for r in json.loads((tmp_path / "bench_network.json").read_text())["rows"]}
    assert set(rows) == {"none", "residual-int4"}
    assert all(r["latency_s"] > 0 for r in rows.values())


def test_bench_fidelity_scores_lpips_with_a_local_torchscript_module(tmp_path):
    """--lpips-weights: a local TorchScript distance (here mean |a - b| over [-1, 1] images) is loaded
    and reported per image and on average; nothing is downloaded."""
    import numpy as np
    import torch

    class MeanAbs(torch.nn.Module):
        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return (a - b).abs().mean().reshape(1)

    weights = tmp_path / "distance.pt"
    torch.jit.script(MeanAbs()).save(str(weights))
    script = load_script("bench_fidelity.py")
    ref = np.zeros((8, 8, 3), dtype=np.uint8)
    img = np.full((8, 8, 3), 51, dtype=np.uint8)  # 51 / 127.5 = 0.4 in [-1, 1] units
    summary = script.score([ref, ref], [img, ref], [{"seed": 0}, {"seed": 1}], script.Lpips(str(weights)))
    assert [e["lpips"] for e in summary["per_image"]] == pytest.approx([0.4, 0.0], abs=1e-6)
    assert summary["lpips"] == pytest.approx(0.2, abs=1e-6)
    with pytest.raises(ValueError, match="does not exist"):
        script.Lpips(str(tmp_path / "missing.pt"))


def test_gpu_check_measures_nothing_without_a_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: run scripts/gpu_check.py for real")
    proc = run_script("gpu_check.py", "--out", "unused", expect=2)
    assert json.loads(proc.stdout) == {"error": "no CUDA device: gpu_check measures on a GPU only (nothing was run)"}


def test_the_gpu_sync_check_exchange_runs_and_codes_on_cpu():
    """The exchange gpu_check runs under the sync debug mode, here on CPU (where nothing can be a
    device sync): warm-up raw, then coded steps, and no error recorded."""
    from compactfusion_xdit.testing import run_ranks

    steps = run_ranks("compactfusion_xdit.benchmarks.gpu_checks:sync_free_exchange", 2,
                      {"device": "cpu", "steps": 3, "tokens": 8, "channels": 16}, timeout=90)[0]
    assert [s["kind"] for s in steps] == ["SEED", "CODED", "CODED"]
    assert all(s["stock_sync"] is None and s["compressed_sync"] is None for s in steps)
