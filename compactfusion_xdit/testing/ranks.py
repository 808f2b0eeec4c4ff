"""Launch a function on several CPU ranks (gloo) with a hard timeout.

Used by the test suite and benchmarks: every rank is its own process with one thread, the master
port is a fresh free port, and a launch that exceeds its timeout kills every rank and raises, so a
hang fails the caller instead of stalling it.

    results = run_ranks("tests/comm/test_comm.py:check_all_to_all", world_size=2, kwargs={"n": 4})

The target is ``"path/to/file.py:function"`` or ``"package.module:function"``; it is called as
``function(rank, world_size, **kwargs)`` after ``torch.distributed`` is initialised with gloo
(pass ``init_process_group=False`` to let the target initialise it). Its return value (anything
``torch.save`` can store) comes back in a list indexed by rank.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

from compactfusion_xdit.cli.ports import free_port


class RankFailure(RuntimeError):
    """One or more ranks failed or the launch timed out."""


def kill_all(procs) -> None:
    """SIGKILL the process group of every rank still running (each started with start_new_session) and reap it."""
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        p.wait()


def rank_env(rank: int, world_size: int, port: int, threads: int = 1) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
    )
    return env


def run_ranks(
    target: str,
    world_size: int,
    kwargs: dict[str, Any] | None = None,
    timeout: float = 120.0,
    init_process_group: bool = True,
    env: dict[str, str] | None = None,
) -> list[Any]:
    """Run ``target`` on ``world_size`` ranks; return each rank's result (index = rank)."""
    import torch

    port = free_port()
    with tempfile.TemporaryDirectory(prefix="cfx-ranks-") as tmp:
        spec_path = os.path.join(tmp, "spec.pt")
        torch.save({"target": target, "kwargs": kwargs or {}, "init": init_process_group}, spec_path)
        procs, logs = [], []
        for rank in range(world_size):
            log = open(os.path.join(tmp, f"rank{rank}.log"), "w+")
            renv = rank_env(rank, world_size, port)
            if env:
                renv.update(env)
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "compactfusion_xdit.testing.ranks", spec_path, os.path.join(tmp, f"out{rank}.pt")],
                    env=renv,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
            logs.append(log)
        deadline = time.monotonic() + timeout
        timed_out = False
        try:
            while any(p.poll() is None for p in procs):
                if time.monotonic() > deadline:
                    timed_out = True
                    break
                # One failed rank dooms the others (they would wait for it forever): stop early.
                if any(p.poll() not in (None, 0) for p in procs):
                    time.sleep(2.0)
                    break
                time.sleep(0.05)
        finally:
            kill_all(procs)
        failed = [r for r, p in enumerate(procs) if p.returncode != 0]
        if timed_out or failed:
            tails = []
            for r, log in enumerate(logs):
                log.seek(0)
                tails.append(f"--- rank {r} (exit {procs[r].returncode}) ---\n" + log.read()[-3000:])
            what = f"timed out after {timeout:.0f}s" if timed_out else f"ranks {failed} failed"
            raise RankFailure(f"{target} on {world_size} ranks {what}\n" + "\n".join(tails))
        for log in logs:
            log.close()
        return [torch.load(os.path.join(tmp, f"out{r}.pt"), weights_only=False) for r in range(world_size)]


def _resolve(target: str):
    where, _, name = target.rpartition(":")
    if where.endswith(".py"):
        spec = importlib.util.spec_from_file_location(f"_cfx_target_{abs(hash(where))}", where)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(where)
    return getattr(module, name)


def _main(spec_path: str, out_path: str) -> None:
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    spec = torch.load(spec_path, weights_only=False)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if spec["init"]:
        import datetime

        import torch.distributed as dist

        dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=60))
    result = _resolve(spec["target"])(rank, world_size, **spec["kwargs"])
    torch.save(result, out_path)
    if spec["init"]:
        import torch.distributed as dist

        if dist.is_initialized():
            # rank 0 holds the store: a rank done early must not take it away from one still
            # setting up a group it is not in (gloo: "Broken pipe" in new_group)
            dist.barrier()
            dist.destroy_process_group()


if __name__ == "__main__":
    _main(sys.argv[1], sys.argv[2])
    # The result is saved and the groups are down: skip the interpreter's teardown, where a native
    # thread left behind (gloo, xfuser) once aborted a finished rank in CI ("terminate called
    # without an active exception", exit -6), failing a test whose ranks had all succeeded.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
