"""torchrun as the launchers run it: the command line, the environment, and a supervised wait."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from compactfusion_xdit.cli.plan import LaunchPlan
from compactfusion_xdit.reliability import orphans

WORKER_MODULE = "compactfusion_xdit.rank.worker"


def torchrun_command(plan: LaunchPlan, worker_argv: list[str],
                     target: tuple[str, ...] = ("-m", WORKER_MODULE)) -> list[str]:
    """The torchrun command line; `target` is what each rank runs (``-m module`` or a script path)."""
    return [
        sys.executable, "-m", "torch.distributed.run",
        f"--nproc_per_node={plan.nproc_per_node}", f"--nnodes={plan.nnodes}", f"--node_rank={plan.node_rank}",
        f"--master_addr={plan.master_addr}", f"--master_port={plan.master_port}",
        *target, *worker_argv,
    ]


def launch_env(cuda: bool) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not cuda:
        env.setdefault("OMP_NUM_THREADS", "1")  # ranks share the CPU cores
        env.setdefault("MKL_NUM_THREADS", env["OMP_NUM_THREADS"])
    return env


def run_to_completion(cmd: list[str], env: dict[str, str]) -> int:
    """Run torchrun in its own process group and return its exit status (128 + N for signal N).
    Ctrl-C / SIGTERM stop every rank; torchrun stops the others when one rank fails.

    If this process dies without running the handlers (SIGKILL, a crash), torchrun gets SIGTERM
    from the kernel (parent-death signal, Linux) and stops its ranks; the ranks themselves end
    with torchrun (`compactfusion_xdit.reliability.orphans.exit_with_parent`). Call it from the
    main thread: the parent-death signal follows the thread that started torchrun."""
    env = {**env, orphans.LAUNCHER_PID_ENV: str(os.getpid())}
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=orphans.launcher_preexec())

    def stop(signum, frame):
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return code if code >= 0 else 128 - code
