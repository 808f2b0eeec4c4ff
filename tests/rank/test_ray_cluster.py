"""The Ray route against a real local Ray cluster: ``ray start --head`` on loopback (its own temp
folder, stopped by process id afterwards), two CPU actors placed by Ray running the ``xfuser``
worker code with ``residual-int4``; the driver gets the output and the stats back, equal to the
same flags launched with torchrun. Slow (a cluster start and two ranks: about 1-2 minutes here);
skipped where Ray is not installed (``pip install 'compactfusion-xdit[ray]'``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'compactfusion-xdit[ray]'")

ARGV = ["--model", "tiny-flux", "--ulysses_degree", "2", "--height", "64", "--width", "64", "--num_inference_steps", "3",
        "--prompt", "a cat", "--seed", "42", "--output_type", "latent", "--compression", "residual-int4",
        "--compression-check"]


def _cluster_pids(temp_dir: str) -> list[int]:
    """Processes of this test's cluster: their command line names its temp folder."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if temp_dir.encode() in f.read():
                        pids.append(int(entry))
            except OSError:
                pass
    return pids


@pytest.fixture(scope="module")
def cluster():
    from compactfusion_xdit.cli.ports import free_port

    temp_dir = tempfile.mkdtemp(prefix="cfxray")
    port = free_port()
    head = subprocess.Popen([sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
                             "--node-ip-address", "127.0.0.1", "--port", str(port), "--num-cpus", "2",
                             "--include-dashboard", "false", "--disable-usage-stats", "--temp-dir", temp_dir],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    try:
        address = f"127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "status", "--address", address],
                             capture_output=True).returncode != 0:
            assert head.poll() is None and time.monotonic() < deadline, head.stdout.read() if head.poll() else "timeout"
            time.sleep(1.0)
        yield address
    finally:
        if ray.is_initialized():
            ray.shutdown()
        try:
            os.killpg(head.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        for pid in _cluster_pids(temp_dir):  # a cluster process that left the head's group
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(1.0)
        assert _cluster_pids(temp_dir) == []
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_a_compressed_request_on_ray_actors_returns_output_and_stats(cluster, tmp_path):
    from compactfusion_xdit import ray_support

    got = ray_support.run(ARGV, address=cluster, timeout_s=600)
    latents, stats = got["outputs"][0], got["stats"][0]
    assert got["world_size"] == 2 and stats["world_size"] == 2
    ulysses = stats["paths"]["ulysses"]
    assert ulysses["sent_bytes"] < ulysses["raw_bytes"]
    assert stats["cache_consistent"] is True and stats["compression"] == "residual-int4"
    from compactfusion_xdit.benchmarks.two_nodes import xfuser_command

    proc = subprocess.run([*xfuser_command(), *ARGV, "--output_dir", str(tmp_path)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    torchrun = np.load(tmp_path / "latents.npy")
    assert float(np.abs(np.asarray(latents) - torchrun).max()) <= 1e-5  # the same worker code, the same result
    with open(tmp_path / "stats.json") as f:
        assert json.load(f)["paths"]["ulysses"]["sent_bytes"] == ulysses["sent_bytes"]
