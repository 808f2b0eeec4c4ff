"""The drop-in route with a real client: xfuser's own example scripts, shipped in its wheel and run
unmodified, through ``torchrun -m compactfusion_xdit.launch`` on two CPU ranks.

The examples are GPU scripts (``.to("cuda:N")``, ``torch.Generator(device="cuda")``,
``torch.cuda.*`` memory calls), so each rank runs the test-only wrapper
`compactfusion_xdit.testing.cuda_on_cpu`, which maps those calls to the CPU and then calls
``compactfusion_xdit.launch.main`` with the very arguments a user would give the launcher.
Each run resolves its built-in model (``--model tiny-pixart``) from a private cache (built once
by the test beforehand, so the two ranks do not both build it), writes the
example's ``results/`` folder into its own temporary directory, and must print the
``--compression-stats`` table summed over both ranks after the script destroyed its process group.
"""

from __future__ import annotations

import ast
import os
import re
import signal
import subprocess
import sys

import pytest

from compactfusion_xdit import launch
from compactfusion_xdit.testing import free_port

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RUN_TIMEOUT = 240  # seconds: torchrun, two xfuser imports and a model build on a busy 2-core machine


def examples_dir() -> str:
    """The folder of xfuser's example scripts: its wheel installs them as a top-level ``examples``
    (namespace) package in site-packages."""
    import importlib.util

    spec = importlib.util.find_spec("examples")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if os.path.isfile(os.path.join(folder, "pixartalpha_example.py")):
            return folder
    pytest.fail("xfuser's examples/ (pixartalpha_example.py) is not installed")


def run_example(script: str, model: str, workdir, cache, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node 2 -m <cuda_on_cpu wrapper> --compression residual-int4 ...
    <examples>/script --model NAME ...`` in `workdir`; every process is killed on timeout."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}",
           "-m", "compactfusion_xdit.testing.cuda_on_cpu",
           "--compression", "residual-int4", "--compression-stats", *extra,
           os.path.join(examples_dir(), script),
           "--model", model, "--ulysses_degree", "2", "--height", "32", "--width", "32",
           "--num_inference_steps", "2", "--no_use_resolution_binning", "--prompt", "a cat"]
    env = {**os.environ, "CFX_CACHE": str(cache), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.Popen(cmd, cwd=str(workdir), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{script} did not finish within {RUN_TIMEOUT} s:\n{out[-4000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


def table_rows(output: str) -> dict[str, tuple[int, int, int]]:
    """``{path: (messages, raw bytes, sent bytes)}`` from the printed ``--compression-stats`` table."""
    rows = {}
    for match in re.finditer(r"^(\w+)\s+(\d+)\s+(\d+)\s+(\d+)\s+[\d.]+x$", output, re.MULTILINE):
        rows[match.group(1)] = (int(match.group(2)), int(match.group(3)), int(match.group(4)))
    return rows


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A private model cache (each test builds its model into it before launching the ranks)."""
    return tmp_path_factory.mktemp("cfx-cache")


@pytest.mark.parametrize("script, model, extra", [
    ("pixartalpha_example.py", "tiny-pixart", ("--compression-check",)),
    pytest.param("pixartsigma_example.py", "tiny-pixart-sigma", (), marks=pytest.mark.slow),  # CI time
])
def test_shipped_example_runs_compressed(script, model, extra, tmp_path, cache, monkeypatch):
    from compactfusion_xdit.models import registry

    monkeypatch.setenv("CFX_CACHE", str(cache))
    registry.resolve(model)  # built once here; each rank resolves the name to this folder
    proc = run_example(script, model, tmp_path, cache, extra)
    assert proc.returncode == 0, proc.stdout[-6000:]
    out = proc.stdout
    assert "summed over 2 ranks" in out, out[-4000:]  # collected before the script destroyed the group
    rows = table_rows(out)
    assert "ulysses" in rows and "total" in rows, out[-4000:]
    messages, raw, sent = rows["ulysses"]
    assert messages > 0 and raw > 0 and 0 < sent < raw, rows  # bytes counted, compression engaged
    assert rows["total"][1:] == (raw, sent)
    if "--compression-check" in extra:
        assert "sender and receiver caches bitwise equal" in out, out[-4000:]
    images = os.listdir(tmp_path / "results")
    assert len(images) == 1 and images[0].endswith(".png"), images  # the example's own output, in its cwd
    assert out.count("compactfusion: residual-int4") == 1  # rank 0 alone prints the table


def test_builtin_model_names_resolve_and_paths_stay(monkeypatch, tmp_path):
    from compactfusion_xdit.models import registry

    monkeypatch.setattr(registry, "resolve", lambda name, announce=None: f"/cache/{name}")
    monkeypatch.chdir(tmp_path)
    assert launch.resolve_model_arg(["--model", "tiny-pixart", "--ulysses_degree", "2"]) == \
        ["--model", "/cache/tiny-pixart", "--ulysses_degree", "2"]
    assert launch.resolve_model_arg(["--model=tiny-flux"]) == ["--model=/cache/tiny-flux"]
    untouched = ["--model", "PixArt-alpha/PixArt-XL-2-1024-MS", "--prompt", "tiny-flux"]
    assert launch.resolve_model_arg(untouched) == untouched
    (tmp_path / "tiny-sd3").mkdir()  # a local folder that carries a built-in's name wins
    assert launch.resolve_model_arg(["--model", "tiny-sd3"]) == ["--model", "tiny-sd3"]


def test_report_without_a_process_group_is_per_rank_and_calls_no_collective(capsys, monkeypatch):
    import torch.distributed as dist

    from compactfusion_xdit.core.session import CompressionSession

    assert not dist.is_initialized()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(dist, "all_gather_object", lambda *a, **k: pytest.fail("collective without a group"))
    report = launch.ExitReport(CompressionSession("residual-int4"), stats=True, check=True)
    report.report()
    report.report()  # once only
    out = capsys.readouterr().out
    assert out.count("rank 1 only") == 1 and "total" in out and "already destroyed" in out
    assert report.cache_consistent is None


def test_the_user_route_never_imports_the_cuda_shim():
    with open(launch.__file__) as f:
        tree = ast.parse(f.read())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not any("testing" in name for name in imported), imported
    code = ("import sys, compactfusion_xdit.launch; "
            "sys.exit(any(m.startswith('compactfusion_xdit.testing') for m in sys.modules))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)}
    assert subprocess.run([sys.executable, "-c", code], env=env, timeout=120).returncode == 0
