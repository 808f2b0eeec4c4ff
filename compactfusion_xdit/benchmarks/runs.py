"""Benchmark launches: ranks running `rank_loop` (on loopback or in emulated-link namespaces).

    outs = launch([argv_a, argv_b], world=4, rates=["1gbit"], requests=3, timeout=600, star=star, port=29600)
    outs[0]["phases"][0]["latencies_s"], outs[0]["image"]            # per run: latencies, output image

The controller (this process) answers each phase's handshake, shaping `star`'s links to the
phase's rate first. Any rank failing or the timeout raises `BenchError` with the ranks' log tails;
every rank process is killed and the work folder removed on the way out.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

from compactfusion_xdit.reliability import orphans
from compactfusion_xdit.testing import kill_all


class BenchError(RuntimeError):
    """A launch failed; the message carries the ranks' log tails."""


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def signals_interrupt():
    """Inside the block SIGINT and SIGTERM raise KeyboardInterrupt, so every ``finally`` on the
    way out runs (rank processes killed, namespaces removed) when a benchmark is stopped. SIGTERM
    would otherwise end the controller at once and leave its ranks (own sessions) running."""
    previous = {s: signal.signal(s, _raise_interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def run_stoppable(script: str, body, stopped: str) -> tuple[int, object]:
    """``(0, body())`` with `signals_interrupt` on; a `ValueError` / `BenchError` gives ``(2, None)``
    and an interrupt ``(130, None)``, each after one line on stderr (`stopped` says what was undone)."""
    try:
        with signals_interrupt():
            return 0, body()
    except (ValueError, BenchError) as err:
        print(f"{script}: error: {err}", file=sys.stderr)
        return 2, None
    except KeyboardInterrupt:
        print(f"{script}: interrupted; {stopped}", file=sys.stderr)
        return 130, None


def _rank_env(rank: int, world: int, master: str, port: int, ifname: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
               MASTER_ADDR=master, MASTER_PORT=str(port), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    if ifname:
        env["GLOO_SOCKET_IFNAME"] = ifname
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def launch(runs: list[list[str]], world: int, rates: list[str], requests: int, timeout: float,
           star=None, port: int = 29600, items: list[dict] | None = None, pin: bool = False) -> list[dict]:
    """One launch: `world` ranks (in `star`'s namespaces, or on loopback when None) do each run
    (worker argv) in turn, each serving ``1 + requests`` requests per rate.
    With `items` (request overrides such as ``{"prompt": ..., "seed": ...}``) each run instead
    serves every item once (one phase) and returns its images in ``"images"``. `pin`: each rank
    bound to its own CPU (rank r to the r-th allowed one, modulo their count).
    Returns per run {"phases": [...], "image": uint8 array or None, "images": [...]}."""
    orphans.sweep_temp("cfx-netbench-")  # a launcher killed with -9 could not remove its folder
    workdir = tempfile.mkdtemp(prefix=f"cfx-netbench-{os.getpid()}-")
    procs, logs = [], []
    try:
        spec = os.path.join(workdir, "spec.json")
        with open(spec, "w") as f:
            json.dump({"runs": runs, "port": port, "phases": len(rates), "requests": requests, "workdir": workdir,
                       "phase_timeout": timeout, "items": items, "pin": pin}, f)
        master = star.address(0) if star else "127.0.0.1"
        for rank in range(world):
            cmd = [sys.executable, "-m", "compactfusion_xdit.benchmarks.rank_loop", spec]
            if star:
                cmd = star.rank_command(rank, cmd)
            log = open(os.path.join(workdir, f"rank{rank}.log"), "w+")
            logs.append(log)
            procs.append(subprocess.Popen(cmd, env=_rank_env(rank, world, master, port, star.ifname(rank) if star else None),
                                          stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                          preexec_fn=orphans.launcher_preexec()))  # SIGTERM when we die
        deadline, phase = time.monotonic() + timeout, 0
        while any(p.poll() is None for p in procs):
            if any(p.poll() not in (None, 0) for p in procs):
                time.sleep(1.0)
                raise BenchError(_failure(procs, logs, "a rank failed"))
            if time.monotonic() > deadline:
                raise BenchError(_failure(procs, logs, f"timed out after {timeout:.0f} s"))
            if os.path.exists(os.path.join(workdir, f"phase{phase}.want")):
                if star:
                    star.shape(rates[phase % len(rates)])
                open(os.path.join(workdir, f"phase{phase}.go"), "w").close()
                phase += 1
            time.sleep(0.05)
        if any(p.returncode != 0 for p in procs):
            raise BenchError(_failure(procs, logs, "a rank failed"))
        with open(os.path.join(workdir, "rank0.json")) as f:
            records = json.load(f)["runs"]
        out = []
        for j, record in enumerate(records):
            images = sorted(n for n in os.listdir(workdir) if n.startswith(f"image_run{j}_rank"))
            entry = {"phases": record["phases"], "image": None, "images": []}
            if images:
                entry["image"] = np.load(os.path.join(workdir, images[-1]))
            for k in range(len(items or [])):
                found = sorted(n for n in os.listdir(workdir) if n.startswith(f"item{k}_run{j}_rank"))
                entry["images"].append(np.load(os.path.join(workdir, found[-1])) if found else None)
            out.append(entry)
        return out
    finally:
        kill_all(procs)
        for log in logs:
            log.close()
        shutil.rmtree(workdir, ignore_errors=True)


def _failure(procs, logs, what: str) -> str:
    """`what` and each rank's log tail, the ranks that failed first; progress bars left out."""
    tails = []
    failed_first = sorted(range(len(logs)), key=lambda r: procs[r].poll() in (None, 0))
    for r in failed_first:
        log = logs[r]
        log.flush()
        log.seek(0)
        lines = [ln for ln in log.read().replace("\r", "\n").splitlines() if ln.strip() and "it/s]" not in ln]
        tails.append(f"rank {r} (exit {procs[r].poll()}): " + " | ".join(lines[-14:])[-2000:])
    return what + "; " + "; ".join(tails)
