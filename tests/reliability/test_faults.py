"""Faults: a rank that dies or freezes mid-request stops every other rank (non-zero exit, a message
naming the lost rank, within 60 s, never an infinite wait), and a request that fails on every rank
leaves the plugin clean for the next one. Built-in tiny Flux, Ulysses 2, CPU/gloo; the faults come
from ``CFX_FAULT`` (compactfusion_xdit.reliability.faults)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from compactfusion_xdit.reliability import faults
from compactfusion_xdit.testing import free_port, rank_env, run_ranks

HERE = os.path.abspath(__file__)
#: The spec: every other rank has exited this long after the lost rank stopped.
GRACE_S = 60.0
#: Start-up (imports, model) may take long on a loaded machine; this only guards against hangs.
STARTUP_LIMIT_S = 400.0


def flags(tmp_path, steps: int = 8) -> list[str]:
    return ["--model", "tiny-flux", "--height", "32", "--width", "32", "--num_inference_steps", str(steps),
            "--prompt", "a cat", "--max_sequence_length", "16", "--output_type", "latent", "--ulysses_degree", "2",
            "--compression", "residual-int4", "--output_dir", str(tmp_path / "out")]


@pytest.fixture(scope="module", autouse=True)
def flux():
    from compactfusion_xdit.models import tiny

    tiny.materialize("tiny-flux")


def test_fault_spec_is_validated():
    assert faults.Fault.parse("exit:1:3") == faults.Fault("exit", 1, 3)
    assert faults.Fault.parse("raise:*:2") == faults.Fault("raise", None, 2)
    for bad in ["exit:1", "boom:1:2", "exit:x:2", "exit:1:0"]:
        with pytest.raises(ValueError, match="CFX_FAULT"):
            faults.Fault.parse(bad)


def launch_ranks(tmp_path, fault: str, extra_env: dict | None = None) -> list[tuple[subprocess.Popen, str]]:
    """Two worker processes started directly (no torchrun to stop the survivors for us)."""
    port = free_port()
    procs = []
    for rank in range(2):
        env = rank_env(rank, 2, port)
        env.update(CFX_FAULT=fault, **(extra_env or {}))
        log = str(tmp_path / f"rank{rank}.log")
        with open(log, "w") as f:
            procs.append((subprocess.Popen([sys.executable, "-m", "compactfusion_xdit.rank.worker", *flags(tmp_path)],
                                           env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True), log))
    return procs


def wait_for_survivor(procs, lost: int, lost_stopped) -> tuple[float, str]:
    """Wait until `lost_stopped()` (the fault fired), then until the other rank exits; returns
    (seconds between the two, the survivor's log). Kills everything on the way out."""
    survivor, log = procs[1 - lost]
    try:
        deadline = time.monotonic() + STARTUP_LIMIT_S
        while not lost_stopped():
            assert time.monotonic() < deadline, "the fault never fired:\n" + open(procs[lost][1]).read()[-3000:]
            assert survivor.poll() is None, "the survivor ended first:\n" + open(log).read()[-3000:]
            time.sleep(0.1)
        stopped = time.monotonic()
        while survivor.poll() is None and time.monotonic() - stopped < GRACE_S:
            time.sleep(0.1)
        waited = time.monotonic() - stopped
        assert survivor.poll() is not None, f"rank {1 - lost} still running {GRACE_S:.0f} s after rank {lost} stopped"
        return waited, open(log).read()
    finally:
        for p, _ in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def test_a_rank_that_dies_mid_request_stops_the_other_with_its_name(tmp_path):
    procs = launch_ranks(tmp_path, "exit:1:3")
    waited, log = wait_for_survivor(procs, 1, lambda: procs[1][0].poll() is not None)
    assert procs[1][0].returncode == faults.EXIT_STATUS
    assert procs[0][0].returncode == 1, log[-3000:]
    errors = [line for line in log.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and errors[0].startswith("error (rank 0): rank 1 was lost"), log[-3000:]
    assert "Traceback" not in log
    print(f"rank 0 exited {waited:.1f} s after rank 1 died")


@pytest.mark.slow
def test_a_frozen_rank_is_timed_out_and_named(tmp_path):
    """Rank 1 stops (SIGSTOP) mid-request: its sockets stay open, so only the timeout ends the wait."""
    procs = launch_ranks(tmp_path, "freeze:1:3", {"CFX_COMM_TIMEOUT_S": "10"})
    frozen = lambda: "freezes at scheduler step" in open(procs[1][1]).read()  # noqa: E731
    waited, log = wait_for_survivor(procs, 1, frozen)
    assert procs[0][0].returncode == 1, log[-3000:]
    errors = [line for line in log.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and errors[0].startswith("error (rank 0): rank 1 was lost"), log[-3000:]
    print(f"rank 0 exited {waited:.1f} s after rank 1 froze")


FROZEN_PEER = """
import os, signal, sys
import torch, torch.distributed as dist
from compactfusion_xdit.reliability import liveness
liveness.init_process_group("gloo")
liveness.start_liveness()
if dist.get_rank() == 1:
    print("freezes", flush=True)
    os.kill(os.getpid(), signal.SIGSTOP)
try:
    dist.all_reduce(torch.ones(1))
except Exception as err:
    print(f"error (rank 0): {liveness.lost_ranks_note()}{type(err).__name__}", flush=True)
    sys.exit(1)
"""


def test_a_frozen_peer_is_timed_out_and_named_without_a_model(tmp_path):
    """The CI-sized twin of the slow test above: the same timeout and probe, around one collective."""
    script = tmp_path / "frozen_peer.py"
    script.write_text(FROZEN_PEER)
    port, procs = free_port(), []
    for rank in range(2):
        env = {**rank_env(rank, 2, port), "CFX_COMM_TIMEOUT_S": "3"}
        log = str(tmp_path / f"rank{rank}.log")
        with open(log, "w") as f:
            procs.append((subprocess.Popen([sys.executable, str(script)], env=env, stdout=f, stderr=subprocess.STDOUT,
                                           start_new_session=True), log))
    waited, log = wait_for_survivor(procs, 1, lambda: "freezes" in open(procs[1][1]).read())
    assert procs[0][0].returncode == 1, log[-3000:]
    errors = [line for line in log.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and errors[0].startswith("error (rank 0): rank 1 was lost"), log[-3000:]
    assert 3 <= waited < GRACE_S  # not before the timeout, and never a hang


@pytest.mark.slow
def test_a_rank_that_dies_under_the_xfuser_command_fails_the_launch(tmp_path):
    """Through ``xfuser`` (torchrun's agent stops the survivors): non-zero status, the lost rank named."""
    env = dict(os.environ, CFX_FAULT="exit:1:3")
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "compactfusion_xdit.cli.launcher", *flags(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=STARTUP_LIMIT_S + GRACE_S)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert "rank 1 exits at scheduler step 3" in out
    # the launcher's line for a rank that ended without an error line, or rank 0's own line
    assert "rank 1 exited with status 17" in out or "rank 1 was lost" in out, out[-3000:]
    print(f"xfuser exited with {proc.returncode} after {time.monotonic() - start:.1f} s in all")


def failed_request_then_retry(rank: int, world_size: int, argv: list[str]) -> dict:
    """Request A, then a request that raises on every rank at its second step, then A again."""
    from compactfusion_xdit import patches
    from compactfusion_xdit.rank import serving, worker

    args = worker.parse_args(argv)
    loaded = worker.load_pipeline(args)
    session = patches.session()
    images = lambda out: None if out is None else out.images  # noqa: E731  (the last rank's output)
    first = images(worker.call_pipeline(loaded, args))
    hook = faults.install(loaded.pipe, rank, "raise:*:1000")
    hook.fault = faults.Fault("raise", None, hook.calls + 2)  # the 2nd step of the next request
    failed = None
    try:  # through the ranks' request loop, which must drop what the failed request left behind
        serving.serve_requests(session, [None], lambda _: worker.call_pipeline(loaded, args, prompt="a dog", height=48))
    except faults.InjectedFault as err:
        failed = str(err)
    after_failure = session.state.stats()["cache_entries"]
    session.lifecycle.reset_checks()
    again = images(worker.call_pipeline(loaded, args))
    session.lifecycle.check_caches()
    return {"failed": failed, "cache_entries_after_failure": after_failure, "first": first, "again": again,
            "consistent": session.lifecycle.cache_consistent, "mismatches": session.lifecycle.mismatches[:5]}


def test_a_failed_request_leaves_the_plugin_clean_for_the_next(tmp_path):
    argv = flags(tmp_path, steps=4) + ["--compression-check"]
    results = run_ranks(f"{HERE}:failed_request_then_retry", 2, {"argv": argv}, timeout=300, init_process_group=False)
    for rank, r in enumerate(results):
        assert r["failed"] and "injected failure" in r["failed"], r["failed"]
        assert r["cache_entries_after_failure"] == 0
        assert r["consistent"] is True, r["mismatches"]
    out = results[1]
    assert torch.equal(out["first"], out["again"])  # as if the failed request had never run


def test_a_peer_that_does_not_answer_is_reported_lost():
    from compactfusion_xdit.reliability import liveness

    me, alive, gone = liveness.Responder(), liveness.Responder(), liveness.Responder()
    gone.close()  # its port now refuses connections, as a dead process's would
    try:
        peers = liveness.Peers(0, [("127.0.0.1", me.port), ("127.0.0.1", alive.port), ("127.0.0.1", gone.port)], me)
        assert peers.lost_ranks(timeout_s=10.0) == [2]
    finally:
        me.close()
        alive.close()


@pytest.mark.parametrize("value", ["0", "-3", "soon"])
def test_a_bad_timeout_setting_names_the_variable(monkeypatch, value):
    from compactfusion_xdit.reliability import liveness

    monkeypatch.setenv("CFX_COMM_TIMEOUT_S", value)
    with pytest.raises(ValueError, match="CFX_COMM_TIMEOUT_S"):
        liveness.timeout_seconds()
    monkeypatch.setenv("CFX_COMM_TIMEOUT_S", "12.5")
    assert liveness.timeout_seconds() == 12.5
