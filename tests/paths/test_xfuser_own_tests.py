"""Regression guard: xfuser's own CPU-runnable tests still pass with our patches installed.

The xfuser 0.7.0 wheel installs its test suite as the top-level package ``tests`` in
site-packages. ``SELECTION`` lists the modules that run on CPU/gloo (survey and reasons for
the rest: docs/xfuser_own_tests.md). Each run happens in a subprocess with a hard timeout,
via ``tests/paths/_xfuser_own_tests_runner.py``, which installs the patches before xfuser loads.
"""

import importlib.util
import os
import re
import subprocess
import sys

import pytest

RUNNER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_xfuser_own_tests_runner.py")
SELECTION = (
    "core/test_checkpoint_io.py",
    "core/test_checkpoint_request_contract.py",
    "core/test_cli.py",
    "core/test_derived_tensor_fill.py",
    "core/test_determinism_check.py",
    "core/test_distvae_integration.py",
    "core/test_dtype_policy.py",
    "core/test_envs.py",
    "core/test_format_backend_adapters.py",
    "core/test_fp8_backend_adapter_contract.py",
    "core/test_fp8_blockwise_hybrid_routing.py",
    "core/test_gemm_flag_validation.py",
    "core/test_gilbert.py",
    "core/test_load_failure_messages.py",
    "core/test_load_path_contracts.py",
    "core/test_loading_contracts.py",
    "core/test_ltx2_tile_assignment.py",
    "core/test_meta_load_safety.py",
    "core/test_mxfp6.py",
    "core/test_per_model_load_contracts.py",
    "core/test_replicated_load_decision.py",
    "core/test_ring_flash_attn_fa3_args.py",
    "core/test_text_encoder_framework_adapter.py",
    "core/test_text_encoder_manifest.py",
    "core/test_vae_lifecycle.py",
    "core/test_video_utils.py",
    "core/test_vsa_attention.py",
    "core/test_vsa_h3_attention.py",
    "layers/test_fp8_linear_operand_placement.py",
    "layers/test_fp8_linear_sentinel.py",
    "layers/test_mxfp4_linear_registration.py",
    "test_ideogram4_pipeline.py",
    "test_sd3_text_sequence_parallel.py",
    "test_wan_distilled.py",
)
MIN_PASSED = 650  # the survey measured 658 passed, 18 skipped
TIMEOUT_S = 240


def xfuser_tests_dir() -> str:
    spec = importlib.util.find_spec("xfuser")
    assert spec is not None and spec.origin, "xfuser is not installed"
    return os.path.join(os.path.dirname(os.path.dirname(spec.origin)), "tests")


def run_selection(mode: str, tmp_path) -> tuple[int, dict[str, int], str]:
    root = xfuser_tests_dir()
    paths = [os.path.join(root, m) for m in SELECTION]
    missing = [p for p in paths if not os.path.exists(p)]
    assert not missing, f"xfuser test modules not found (xfuser version changed?): {missing}"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [
        sys.executable, RUNNER, mode, "-q", "-p", "no:cacheprovider", "-o", "addopts=",
        "--rootdir", root, "--import-mode=importlib", *paths,
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    out = proc.stdout + proc.stderr
    summaries = [ln for ln in proc.stdout.splitlines() if re.search(r" in [\d.]+s", ln)]
    summary = summaries[-1] if summaries else ""
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|errors?|skipped)", summary)}
    return proc.returncode, counts, out


# "none" installs a subset of what "raw-paths" installs: it runs with -m slow, to keep CI short.
@pytest.mark.parametrize("mode", [pytest.param("none", marks=pytest.mark.slow), "raw-paths"])
def test_xfuser_own_tests_pass_with_patches(mode, tmp_path):
    rc, counts, out = run_selection(mode, tmp_path)
    assert rc == 0, f"xfuser's own tests failed under mode {mode}:\n{out[-6000:]}"
    assert counts.get("passed", 0) >= MIN_PASSED, f"too few tests passed ({counts}):\n{out[-3000:]}"
    assert not counts.get("failed") and not counts.get("error") and not counts.get("errors"), counts
