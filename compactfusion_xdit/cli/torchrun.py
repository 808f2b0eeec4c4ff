"""torchrun as the launchers run it: the command line, the environment, and a supervised wait.

What the user sees of a failed launch: the ranks' own one-line errors (``xfuser: error: ...``,
each distinct line once), not torchrun's ChildFailedError traceback and report. For that, torchrun's
own messages (its log lines, its traceback) go to a pipe of their own, while the ranks' stderr
(progress bars, warnings, error lines) is passed on live; ranks' stdout is not touched. When no rank
said why it failed (killed by a signal, ``os._exit``), one line from torchrun's report says which rank
ended how; when torchrun itself failed before its ranks (rendezvous, port), its output is shown as is.
``CFX_DEBUG=1`` runs torchrun with everything passed through (its full report, the ranks' tracebacks).
"""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import threading

from compactfusion_xdit import envs
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


def run_to_completion(cmd: list[str], env: dict[str, str], prog: str = "xfuser") -> int:
    """Run torchrun in its own process group and return its exit status (128 + N for signal N;
    2 when the first rank to fail ended with a usage error). Ctrl-C / SIGTERM stop every rank;
    torchrun stops the others when one rank fails. A failure is reported as the ranks' error lines
    (see the module docstring; `prog` prefixes a rank's bare ``error: ...`` line).

    If this process dies without running the handlers (SIGKILL, a crash), torchrun gets SIGTERM
    from the kernel (parent-death signal, Linux) and stops its ranks; the ranks themselves end
    with torchrun (`compactfusion_xdit.reliability.orphans.exit_with_parent`). Call it from the
    main thread: the parent-death signal follows the thread that started torchrun."""
    orphans.sweep_temp("cfx-peers-")  # a launcher killed with -9 could not remove its file
    peers_file = orphans.temp_path("cfx-peers-", ".json")
    env = {**env, orphans.LAUNCHER_PID_ENV: str(os.getpid()), envs.PEERS_FILE: peers_file}
    try:
        return _run(cmd, env, prog, peers_file)
    finally:
        try:
            os.unlink(peers_file)
        except OSError:
            pass


def _run(cmd: list[str], env: dict[str, str], prog: str, peers_file: str) -> int:
    quiet = cmd[1:3] == ["-m", TORCHRUN_MODULE] and not envs.flag(envs.DEBUG)
    if not quiet:
        return _supervise(subprocess.Popen(cmd, env=env, start_new_session=True,
                                           preexec_fn=orphans.launcher_preexec()))[0]
    agent_read, agent_write = os.pipe()  # torchrun's own stderr (its Python sys.stderr)
    ranks_read, ranks_write = os.pipe()  # torchrun's fd 2, which its ranks inherit
    try:
        proc = subprocess.Popen([cmd[0], "-c", _AGENT_CODE, str(agent_write), *cmd[3:]], env=env,
                                stderr=ranks_write, pass_fds=(agent_write,), start_new_session=True,
                                preexec_fn=orphans.launcher_preexec())
    finally:
        os.close(agent_write)
        os.close(ranks_write)
    agent_text: list[bytes] = []
    errors = _ErrorLines(prog)
    readers = [threading.Thread(target=_collect, args=(agent_read, agent_text), daemon=True),
               threading.Thread(target=_forward, args=(ranks_read, errors), daemon=True)]
    for reader in readers:
        reader.start()
    code, stopped = _supervise(proc)
    for reader in readers:
        reader.join(timeout=10.0)  # EOF once every rank has ended; a rank that outlives torchrun is not waited for
    report = b"".join(agent_text).decode(errors="replace")
    if code == 0 or stopped:
        _write_stderr(report if code == 0 else "")
        return code
    root = _root_cause(report)
    if root is None:  # torchrun failed on its own (no rank report): its words, as it wrote them
        _write_stderr(report)
        return code
    rank, status = root
    if not errors.seen:
        how = f"was killed by {_signal_name(-status)}" if status < 0 else f"exited with status {status}"
        _write_stderr(("" if errors.at_line_start else "\n") + f"{prog}: error: rank {rank} {how} without an error message; "
                      f"set {envs.DEBUG}=1 for torchrun's report\n")
    if not any(b" lost " in line for line in errors.seen):  # no rank named a lost peer (e.g. NCCL's watchdog)
        from compactfusion_xdit.reliability import liveness  # imports torch: only after a failure

        lost = liveness.lost_in_file(peers_file, _local_ranks(cmd))
        if lost:
            _write_stderr(f"{prog}: error: rank{'s' if len(lost) > 1 else ''} {', '.join(map(str, lost))} on other "
                          f"nodes {'do' if len(lost) > 1 else 'does'} not answer (lost: process or node gone)\n")
    return 2 if status == 2 else code


TORCHRUN_MODULE = "torch.distributed.run"

#: What the torchrun process runs: torchrun itself, with its Python-level stderr (log lines, the
#: ChildFailedError traceback) on the inherited descriptor argv[1]; its fd 2 stays the ranks' stderr.
_AGENT_CODE = ("import runpy, sys; "
               "sys.stderr = open(int(sys.argv.pop(1)), 'w', buffering=1, errors='replace'); "
               "sys.argv[0] = 'torchrun'; "
               f"runpy.run_module({TORCHRUN_MODULE!r}, run_name='__main__', alter_sys=True)")

#: A rank's one-line error (`compactfusion_xdit.rank.serving.run_rank`, argparse): ``[prog: ]error[ (rank N)]: ...``.
_ERROR_LINE = re.compile(rb"^(?:[\w.-]+: )?error(?: \(rank \d+\))?: \S")
_ERROR_IN_LINE = re.compile(rb"(?:\b[\w.-]+: )?error(?: \(rank \d+\))?: \S")


def _supervise(proc: subprocess.Popen) -> tuple[int, bool]:
    """Wait for `proc` with Ctrl-C / SIGTERM passed to its process group; (exit status, whether a
    signal stopped it)."""
    stopped = []

    def stop(signum, frame):
        stopped.append(signum)
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
    return (code if code >= 0 else 128 - code), bool(stopped)


class _ErrorLines:
    """The ranks' error lines passed on so far: each distinct line once, prefixed with the
    launcher's name when the rank printed a bare ``error: ...``; and whether what was passed on
    ends a line (an error line after a progress bar's partial line starts a line of its own)."""

    def __init__(self, prog: str) -> None:
        self.prog = prog.encode()
        self.seen: set[bytes] = set()
        self.at_line_start = True

    def filter(self, line: bytes) -> bytes | None:
        """`line` (no newline) as it should be shown, or None to drop it (a repeat)."""
        if not _ERROR_LINE.match(line):
            return line
        if line.startswith(b"error") and self.prog:
            line = self.prog + b": " + line
        if line in self.seen:
            return None
        self.seen.add(line)
        return line if self.at_line_start else b"\n" + line

    def write(self, out, data: bytes) -> None:
        if data:
            _write_bytes(out, data)
            self.at_line_start = data.endswith(b"\n")


def _forward(fd: int, errors: _ErrorLines, flush_after_s: float = 0.2) -> None:
    """Copy the ranks' stderr from `fd` to ours as it comes, dropping repeated error lines.
    Whole lines are checked; a partial line is held for at most `flush_after_s` (or passed on at once
    when it holds a carriage return: a progress bar redrawing itself)."""
    out = sys.stderr
    pending = b""
    with os.fdopen(fd, "rb", buffering=0) as pipe:
        while True:
            if pending:
                ready, _, _ = select.select([pipe], [], [], flush_after_s)
                if not ready:
                    errors.write(out, pending)
                    pending = b""
                    continue
            chunk = pipe.read(65536)
            if not chunk:
                break
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                head, line = _split_error(line)
                errors.write(out, head)
                shown = errors.filter(line)
                if shown is not None:
                    errors.write(out, shown + b"\n")
            if b"\r" in pending:
                errors.write(out, pending)
                pending = b""
    errors.write(out, pending)


def _split_error(line: bytes) -> tuple[bytes, bytes]:
    """(a progress bar's partial line, the error line written right after it) when a rank's error
    line follows another rank's unfinished ``\\r`` redraw in the pipe; else (b"", line)."""
    if _ERROR_LINE.match(line) or b"\r" not in line:
        return b"", line
    start = line.rindex(b"\r") + 1
    found = _ERROR_IN_LINE.search(line, start)
    return (line[:found.start()], line[found.start():]) if found else (b"", line)


def _collect(fd: int, into: list[bytes]) -> None:
    with os.fdopen(fd, "rb", buffering=0) as pipe:
        for chunk in iter(lambda: pipe.read(65536), b""):
            into.append(chunk)


def _write_bytes(out, data: bytes) -> None:
    if not data:
        return
    try:
        out.flush()
        buffer = getattr(out, "buffer", None)
        if buffer is not None:
            buffer.write(data)
            buffer.flush()
        else:  # a text stream without a buffer (tests' redirect_stderr)
            out.write(data.decode(errors="replace"))
            out.flush()
    except (OSError, ValueError):  # our stderr is gone: nothing to show it on
        pass


def _write_stderr(text: str) -> None:
    _write_bytes(sys.stderr, text.encode())


def _root_cause(report: str) -> tuple[int, int] | None:
    """(rank, exit status) of the first failure in torchrun's ChildFailedError report, or None.
    A negative status is a signal (torchrun's convention)."""
    _, found, rest = report.partition("Root Cause")
    if not found:
        return None
    rank = re.search(r"^\s*rank\s*:\s*(\d+)", rest, re.MULTILINE)
    status = re.search(r"^\s*exitcode\s*:\s*(-?\d+)", rest, re.MULTILINE)
    return (int(rank.group(1)), int(status.group(1))) if rank and status else None


def _local_ranks(cmd: list[str]) -> range:
    """The global ranks torchrun places on this node (from its ``--nproc_per_node``/``--node_rank``)."""
    flags = dict(arg[2:].split("=", 1) for arg in cmd if arg.startswith("--") and "=" in arg)
    try:
        nproc, node = int(flags.get("nproc_per_node", "0")), int(flags.get("node_rank", "0"))
    except ValueError:
        return range(0)
    return range(node * nproc, (node + 1) * nproc)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
