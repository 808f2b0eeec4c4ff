"""The benchmark scripts in their quick modes, their metrics, and the emulated links' clean-up."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time

import numpy as np
import pytest

from compactfusion_xdit.benchmarks import metrics, netns

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPTS = os.path.join(ROOT, "scripts")


def _run_script(name: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, os.path.join(SCRIPTS, name), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


# ------------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------------


def test_ssim_of_two_constant_images_is_the_luminance_term():
    a, b = np.full((24, 24, 3), 100, np.uint8), np.full((24, 24, 3), 140, np.uint8)
    c1 = (0.01 * 255) ** 2
    assert metrics.ssim(a, b) == pytest.approx((2 * 100 * 140 + c1) / (100 ** 2 + 140 ** 2 + c1), rel=1e-12)


def test_ssim_is_one_for_equal_images_and_drops_with_noise():
    x = np.random.default_rng(0).integers(0, 256, (40, 40, 3)).astype(np.uint8)
    noisy = np.clip(x.astype(int) + np.random.default_rng(1).integers(-80, 81, x.shape), 0, 255).astype(np.uint8)
    assert metrics.ssim(x, x) == pytest.approx(1.0, abs=1e-12)
    assert metrics.ssim(x, noisy) < 0.9


def test_psnr_of_an_off_by_one_image_is_20_log10_255():
    x = np.full((8, 8, 3), 10, np.uint8)
    assert math.isinf(metrics.psnr(x, x))
    assert metrics.psnr(x, x + 1) == pytest.approx(20 * math.log10(255.0), rel=1e-12)


# ------------------------------------------------------------------------------------------------
# project_gpu
# ------------------------------------------------------------------------------------------------


def test_projection_from_recorded_figures_has_every_row_and_is_labelled(tmp_path):
    proc = _run_script("project_gpu.py", "--out", str(tmp_path), timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "project_gpu.json").read_text())
    assert "PROJECTION" in result["label"] and "PROJECTION" in (tmp_path / "project_gpu.md").read_text()
    rows = result["rows"]
    assert len(rows) == 3 * len(result["links"]) * len(result["methods"]) * len(result["codecs"])
    assert all(r["speedup_vs_none"] == pytest.approx(1.0) for r in rows if r["codec"] == "none")
    slow = {(r["method"], r["codec"]): r for r in rows if r["ranks"] == 4 and r["link"].startswith("1 GbE")}
    # on 1 GbE the uncompressed Ulysses step is dominated by the exchange, and int4 sends ~4x fewer bytes
    assert slow[("ulysses", "none")]["comm_share"] > 0.9
    assert 3.0 < slow[("ulysses", "residual-int4")]["speedup_vs_none"] < 4.2
    assert "bench_fused_h100.json" in result["figures"]["codec"]["source"]


def test_projection_measuring_branch_runs_on_cpu_with_a_tiny_block(tmp_path):
    proc = _run_script("project_gpu.py", "--device", "cpu", "--tiny", "--reps", "1", "--ranks", "2",
                       "--out", str(tmp_path), timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "project_gpu.json").read_text())
    compute = result["figures"]["compute"]
    assert compute["double_block_s"] > 0 and compute["single_block_s"] > 0
    assert compute["source"].startswith("measured here")
    assert set(result["figures"]["codec"]["codecs"]) == {"int4", "int2", "1bit"}
    # int4 wire bytes per fp16 element: 4 bits of data plus per-token/per-channel scales
    assert 0.5 < result["figures"]["codec"]["codecs"]["int4"]["bytes_per_elem"] < 0.7


# ------------------------------------------------------------------------------------------------
# bench_fidelity
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow  # bench_fidelity runs in CI through its --path table (tests/benchmarks/test_scripts.py)
def test_fidelity_quick_mode_scores_every_codec_against_the_single_process_output(tmp_path):
    proc = _run_script("bench_fidelity.py", "--quick", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((tmp_path / "bench_fidelity.json").read_text())
    rows = {r["codec"]: r for r in result["rows"]}
    assert set(rows) == {"none", "residual-int4", "int4"} and all(r["method"] == "ulysses" for r in rows.values())
    for r in rows.values():
        assert r["images"] == 1 and r["missing"] == 0 and 0.0 < r["ssim"] <= 1.0
    # measured (tiny-flux 64x64, 2 ranks): none bitwise the single process (capped at 100 dB),
    # residual-int4 74.0 dB, int4 64.4 dB
    assert rows["none"]["identical"] == 1 and rows["none"]["psnr_db"] == 100.0
    assert rows["residual-int4"]["psnr_db"] > 70 and rows["int4"]["psnr_db"] > 60
    # int4 and residual-int4 move the same tensors with the same payload sizes
    assert rows["residual-int4"]["raw_bytes"] == rows["int4"]["raw_bytes"] > rows["residual-int4"]["sent_bytes"]
    assert rows["residual-int4"]["psnr_db"] > rows["int4"]["psnr_db"]
    assert "| ulysses | residual-int4 |" in (tmp_path / "bench_fidelity.md").read_text()


def _stop_when(proc: subprocess.Popen, ready, sig: int, wait_s: float) -> str:
    """Wait up to `wait_s` for `ready()`, assert it, send `sig` to `proc`; its stderr once it exits
    (killed if it does not within a minute)."""
    try:
        deadline = time.monotonic() + wait_s
        while not ready() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert ready(), "the run did not reach the point to stop it at"
        proc.send_signal(sig)
        return proc.communicate(timeout=60)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _processes_mentioning(text: str) -> list[int]:
    """pids whose command line contains `text` (Linux /proc)."""
    found = []
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if text.encode() in f.read():
                    found.append(int(pid))
        except (OSError, ValueError):
            continue
    return found


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc")
def test_a_stopped_benchmark_leaves_no_rank_running(tmp_path):
    # rank processes run in their own sessions: SIGTERM to the controller must still stop them
    work = tmp_path / "tmp"
    work.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, TMPDIR=str(work))
    proc = subprocess.Popen([sys.executable, os.path.join(SCRIPTS, "bench_fidelity.py"), "--quick", "--out", str(tmp_path)],
                            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err = _stop_when(proc, lambda: bool(_processes_mentioning(str(work))), signal.SIGTERM, 120)
    assert proc.returncode == 130 and "interrupted" in err, err
    deadline = time.monotonic() + 10
    while _processes_mentioning(str(work)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _processes_mentioning(str(work)) == []


# ------------------------------------------------------------------------------------------------
# bench_network (root, ip, tc and working namespaces only)
# ------------------------------------------------------------------------------------------------

_NETNS_REASON = netns.unavailable_reason()
needs_netns = pytest.mark.skipif(_NETNS_REASON is not None, reason=f"emulated links unavailable: {_NETNS_REASON}")


def _import_bench_network():
    sys.path.insert(0, SCRIPTS)
    try:
        import bench_network
    finally:
        sys.path.remove(SCRIPTS)
    return bench_network


def test_network_bench_refuses_cleanly_where_namespaces_are_unavailable(monkeypatch, capsys):
    bench_network = _import_bench_network()
    monkeypatch.setattr(bench_network.netns, "unavailable_reason", lambda: "needs root (test)")
    assert bench_network.main(["--quick", "--out", "/nonexistent"]) == 2
    assert "bench_network: needs root (test)" in capsys.readouterr().err


@needs_netns
def test_star_shapes_every_link_and_removes_everything():
    with netns.Star(2, tag="ab0c1") as star:
        star.shape("100mbit")
        lines = star.qdiscs()
        assert len(lines) == 4 and all("tbf" in ln and "100Mbit" in ln for ln in lines)
        star.shape("unshaped")
        assert not any("tbf" in ln for ln in star.qdiscs())
        assert len(netns.leftovers("ab0c1")["namespaces"]) == 3
    assert netns.leftovers("ab0c1") == {"namespaces": [], "links": []}


@needs_netns
def test_cleanup_option_removes_a_killed_runs_namespaces():
    subprocess.run(["ip", "netns", "add", "cfxb-ab0c2-r0"], check=True)
    subprocess.run(["ip", "link", "add", "cfxab0c2r0", "type", "veth", "peer", "name", "cfxab0c2h0"], check=True)
    found = netns.leftovers("ab0c2")
    assert found["namespaces"] == ["cfxb-ab0c2-r0"] and sorted(found["links"]) == ["cfxab0c2h0", "cfxab0c2r0"]
    proc = _run_script("bench_network.py", "--cleanup", "--tag", "ab0c2", timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert netns.leftovers("ab0c2") == {"namespaces": [], "links": []}


@needs_netns
def test_network_bench_leaves_nothing_after_a_failure(tmp_path):
    proc = _run_script("bench_network.py", "--quick", "--tag", "ab0c3", "--fail-after-setup", "--out", str(tmp_path),
                       timeout=120)
    assert proc.returncode == 2 and "simulated failure" in proc.stderr
    assert netns.leftovers("ab0c3") == {"namespaces": [], "links": []}


@needs_netns
def test_network_bench_leaves_nothing_after_ctrl_c(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, os.path.join(SCRIPTS, "bench_network.py"), "--quick", "--tag", "ab0c4",
                             "--out", str(tmp_path)], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err = _stop_when(proc, lambda: len(netns.leftovers("ab0c4")["namespaces"]) == 3, signal.SIGINT, 60)  # hub + 2 ranks
    assert proc.returncode == 130 and "interrupted" in err
    assert netns.leftovers("ab0c4") == {"namespaces": [], "links": []}


@needs_netns
@pytest.mark.slow  # CI time: root, namespaces and a launch per codec (~50 s)
def test_network_quick_mode_measures_latency_bytes_and_psnr(tmp_path):
    proc = _run_script("bench_network.py", "--quick", "--tag", "ab0c5", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((tmp_path / "bench_network.json").read_text())
    rows = {r["codec"]: r for r in result["rows"]}
    assert set(rows) == {"none", "residual-int4"}
    for r in rows.values():
        assert r["method"] == "ulysses" and r["rate"] == "1gbit" and r["latency_s"] > 0
        assert r["latency_s"] == statistics.median(r["latencies_s"]) and len(r["latencies_s"]) == 1  # not the warm-up
    coded, none = rows["residual-int4"], rows["none"]
    # measured: none 89.0 dB (Ulysses sums in another order than one process), residual-int4 71.9 dB
    assert none["identical"] or none["psnr_db"] > 80
    assert coded["psnr_db"] is not None and coded["psnr_db"] > 60
    assert 0 < 2 * coded["sent_bytes"] < coded["raw_bytes"]  # int4 payloads, one raw warm-up step of four
    assert none["speedup_vs_none"] == 1.0
    assert coded["speedup_vs_none"] == pytest.approx(none["latency_s"] / coded["latency_s"])
    assert (tmp_path / "bench_network.png").stat().st_size > 0
    assert netns.leftovers("ab0c5") == {"namespaces": [], "links": []}


def test_network_refuses_an_unknown_codec_before_any_launch(tmp_path):
    proc = _run_script("bench_network.py", "--codecs", "none,residual-int99", "--out", str(tmp_path))
    assert proc.returncode == 2 and "--codecs: " in proc.stderr and "residual-int99" in proc.stderr, proc.stderr
    assert not (tmp_path / "bench_network.json").exists()


def test_network_needs_a_measured_request_besides_the_warm_up(tmp_path):
    proc = _run_script("bench_network.py", "--requests", "0", "--out", str(tmp_path))
    assert proc.returncode == 2 and "--requests 0" in proc.stderr, proc.stderr


def test_network_efficiency_is_the_speedup_over_the_byte_ratio_bound():
    spec = importlib.util.spec_from_file_location("bench_network_script", os.path.join(SCRIPTS, "bench_network.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    base = {"method": "ring", "rate": "10mbit", "ranks": 2, "psnr_db": None, "identical": True, "warmup_s": 1.0}
    rows = [{**base, "codec": "none", "latency_s": 10.0, "latencies_s": [10.0], "raw_bytes": 0, "sent_bytes": 0},
            {**base, "codec": "residual-int4", "latency_s": 4.0, "latencies_s": [4.0], "raw_bytes": 4_000_000,
             "sent_bytes": 1_000_000}]
    script.fill_derived(rows)
    none, coded = rows
    # per-rank raw bytes 2 MB at 10 Mbit/s = 1.6 s of the uncompressed 10 s: s = 0.16, r = 4
    assert coded["comm_share_none"] == pytest.approx(0.16) and coded["byte_ratio"] == 4.0
    assert coded["bound"] == pytest.approx(1 / (0.84 + 0.04))
    assert coded["efficiency"] == pytest.approx(2.5 * (0.84 + 0.04))
    assert none["efficiency"] is None
    # with an unshaped uncompressed run the share is measured: 1 - 8 s / 10 s = 0.2
    fast = {**base, "rate": "unshaped", "codec": "none", "latency_s": 8.0, "latencies_s": [8.0], "raw_bytes": 0,
            "sent_bytes": 0}
    rows = [dict(r) for r in rows] + [fast]
    script.fill_derived(rows)
    coded = rows[1]
    assert coded["comm_share_measured"] == pytest.approx(0.2) and coded["comm_share_bytes"] == pytest.approx(0.16)
    assert coded["comm_share_none"] == pytest.approx(0.2) and coded["bound"] == pytest.approx(1 / (0.8 + 0.05))


def test_network_rounds_pool_each_codecs_requests_across_the_launch():
    spec = importlib.util.spec_from_file_location("bench_network_script", os.path.join(SCRIPTS, "bench_network.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)

    def run(codec, round_, image):
        phases = [{"warmup_s": 9.0 + round_, "latencies_s": [float(10 * round_ + codec + k) for k in (1, 2, 3)],
                   "raw_bytes": 100 + round_, "sent_bytes": 10 + round_, "paths": {}} for _ in range(2)]
        return {"phases": phases, "image": image, "images": []}

    # the launch runs codec 0, codec 1, codec 0, codec 1 (two rounds of two codecs)
    outs = [run(c, r, f"img{c}{r}") for r in (0, 1) for c in (0, 1)]
    pooled = script.pool_rounds(outs, 2)
    assert len(pooled) == 2
    second = pooled[1]
    assert second["image"] == "img10"  # the first round's image
    phase = second["phases"][1]
    assert phase["latencies_s"] == [2.0, 3.0, 4.0, 12.0, 13.0, 14.0]
    assert phase["rounds_s"] == [3.0, 13.0]
    assert phase["warmup_s"] == 9.0 and phase["raw_bytes"] == 101 and phase["sent_bytes"] == 11
    rows = script.build_rows("ring", "residual-int4", ["10mbit", "unshaped"], second, None, 2)
    assert rows[0]["latency_s"] == 8.0 and rows[0]["rounds_s"] == [3.0, 13.0]


@needs_netns
def test_network_bench_leaves_nothing_after_its_launcher_is_sigkilled(tmp_path, monkeypatch):
    """kill -9 of the launcher runs no handler: the ranks end by the parent-death signal and their
    watchdog, the reaper removes the namespaces, and the next launch sweeps the launch folder."""
    from compactfusion_xdit.reliability import orphans

    work = tmp_path / "tmp"
    work.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, TMPDIR=str(work))
    proc = subprocess.Popen([sys.executable, os.path.join(SCRIPTS, "bench_network.py"), "--quick", "--tag", "ab0c6",
                             "--out", str(tmp_path)], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ranks = lambda: [p for p in _processes_mentioning(str(work)) if p != proc.pid]  # noqa: E731
    _stop_when(proc, lambda: len(ranks()) >= 2, signal.SIGKILL, 120)
    deadline = time.monotonic() + 15
    while (ranks() or netns.leftovers("ab0c6")["namespaces"]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ranks() == [] and netns.leftovers("ab0c6") == {"namespaces": [], "links": []}
    left = os.listdir(work)
    assert any(name.startswith(f"cfx-netbench-{proc.pid}-") for name in left), left
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(work))
    orphans.sweep_temp("cfx-netbench-")
    assert not any(name.startswith("cfx-netbench-") for name in os.listdir(work))
