"""No orphaned ranks: a process started by a launcher ends when that launcher dies, however it dies.

Two layers, because each one alone has a gap:

- the kernel's parent-death signal (Linux ``prctl(PR_SET_PDEATHSIG)``): immediate, but it is tied to
  the parent *thread* that forked the child, it is lost if the parent died before the call (the
  child was already re-parented), and it does nothing on other systems;
- a watchdog thread (`exit_with_parent`) that polls ``os.getppid()`` and, once the parent changed,
  sends SIGTERM to the process (its whole process group when it leads one, as a torchrun rank
  does) and SIGKILL after a short grace, so a rank that handles or ignores SIGTERM, or is stuck
  in a collective, still ends.

Who uses what:

- `compactfusion_xdit.cli.torchrun.run_to_completion` starts torchrun with `die_with_parent` as
  ``preexec_fn`` (between fork and exec, in torchrun's process): torchrun gets SIGTERM when the
  launcher dies and then stops its ranks as it does for Ctrl-C. The launcher's pid travels to
  torchrun and its ranks as ``$CFX_LAUNCHER_PID``.
- every rank entry point calls ``exit_with_parent()`` first: a rank ends when its torchrun agent
  dies (torchrun starts ranks from its main thread with ``subprocess.Popen(start_new_session=True)``,
  so the rank leads its own process group and its parent is the agent process).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
import threading
import time

from compactfusion_xdit import envs

LAUNCHER_PID_ENV = envs.LAUNCHER_PID  # set by run_to_completion for torchrun and, through it, every rank
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _load_prctl():
    """libc's ``prctl`` (Linux only), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    return prctl


_PRCTL = _load_prctl()  # loaded at import so that a preexec_fn after fork needs no dlopen


def set_parent_death_signal(signum: int = signal.SIGTERM) -> bool:
    """Ask the kernel to send `signum` to this process when its parent (thread) exits.
    Returns whether it took effect (False off Linux). The setting survives ``exec``."""
    if _PRCTL is None:
        return False
    return _PRCTL(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0) == 0


def die_with_parent(expected_parent: int, signum: int = signal.SIGTERM) -> None:
    """Get `signum` when the parent dies; exit at once (status 1) if `expected_parent` is gone already.

    Async-safe enough for ``subprocess.Popen(preexec_fn=...)``: no imports, no threads. Checking
    ``os.getppid()`` *after* the prctl closes the race where the parent dies between fork and prctl."""
    set_parent_death_signal(signum)
    if os.getppid() != expected_parent:
        os._exit(1)


def launcher_preexec(signum: int = signal.SIGTERM):
    """A ``preexec_fn`` that ties the child to the calling process (its pid is taken now, before fork)."""
    parent = os.getpid()
    return lambda: die_with_parent(parent, signum)


def _parent_of(pid: int) -> int | None:
    """The parent pid of `pid` from /proc, or None if it cannot be read (gone, or no /proc)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    try:  # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after the last ')'
        return int(stat[stat.rindex(b")") + 2:].split()[1])
    except (ValueError, IndexError):
        return None


def _orphaned_at_start(parent: int, launcher: str) -> bool:
    """True when this process's original parent is known to be gone already.

    The parent died before we could arm anything when we now hang under init (or a subreaper) and
    the launcher said who our parent's parent should be (`launcher`, from ``$CFX_LAUNCHER_PID``).
    Without it (a plain torchrun) a parent of 1 is not taken as proof: torchrun may itself be a
    container's pid 1."""
    if not launcher.isdigit():
        return False
    if int(launcher) == parent:  # started by the launcher itself, not through torchrun
        return False
    if not os.path.isdir("/proc/self"):
        return False
    return _parent_of(parent) != int(launcher)


def _end_self(grace_s: float) -> None:
    """SIGTERM this process (its group when it leads one), then SIGKILL after `grace_s`."""
    leader = os.getpgrp() == os.getpid()
    for signum in (signal.SIGTERM, signal.SIGKILL):
        try:
            if leader:
                os.killpg(os.getpid(), signum)
            else:
                os.kill(os.getpid(), signum)
        except OSError:
            pass
        time.sleep(grace_s)
    os._exit(1)  # not reached in practice: SIGKILL ends the process


def _watch(parent: int, poll_s: float, grace_s: float) -> None:
    while os.getppid() == parent:
        time.sleep(poll_s)
    print(f"compactfusion_xdit: rank pid {os.getpid()}: its parent (pid {parent}) is gone; exiting",
          file=sys.stderr, flush=True)
    _end_self(grace_s)


def exit_with_parent(*, parent: int | None = None, poll_s: float = 0.5, grace_s: float = 3.0,
                     only_under_torchrun: bool = True) -> bool:
    """End this process when its parent dies: call it first thing in a rank's entry point.

    Arms the parent-death signal (SIGTERM) and starts a daemon watchdog thread that, once the parent
    pid changes, terminates the process (its process group if it leads one) and kills it
    `grace_s` later: a rank ends within about ``poll_s + grace_s`` seconds of its parent's death.
    Exits at once (status 1) when the parent is known to be gone already.

    `parent` defaults to ``os.getppid()``. With `only_under_torchrun` (the default) it does nothing
    unless torchrun started this process (``$TORCHELASTIC_RUN_ID``) or `parent` is given, so a single
    process run from a shell (``nohup ... &``) is never tied to that shell. Returns whether it armed."""
    if parent is None:
        if only_under_torchrun and not os.environ.get("TORCHELASTIC_RUN_ID"):
            return False
        parent = os.getppid()
        # popped: a process this one starts has another parent and must not check against it
        if _orphaned_at_start(parent, os.environ.pop(LAUNCHER_PID_ENV, "")):
            os._exit(1)
    set_parent_death_signal(signal.SIGTERM)
    if os.getppid() != parent:  # died before (or while) the signal was armed
        os._exit(1)
    threading.Thread(target=_watch, args=(parent, poll_s, grace_s), name="cfx-exit-with-parent",
                     daemon=True).start()
    return True


def temp_path(prefix: str, suffix: str = "") -> str:
    """A path in the temp folder naming this process: ``<tmp>/<prefix><pid><suffix>``. What a launcher
    keeps there survives a ``kill -9``; `sweep_temp` removes it on the next start."""
    import tempfile

    return os.path.join(tempfile.gettempdir(), f"{prefix}{os.getpid()}{suffix}")


def sweep_temp(prefix: str) -> list[str]:
    """Remove the temp files and folders `temp_path(prefix, ...)` made for processes that are gone
    (a launcher killed before it could clean up); returns what was removed."""
    import re
    import shutil
    import tempfile

    removed = []
    folder = tempfile.gettempdir()
    pattern = re.compile(re.escape(prefix) + r"(\d+)(?!\d)")
    for name in os.listdir(folder):
        m = pattern.match(name)
        if not m or _alive(int(m.group(1))):
            continue
        path = os.path.join(folder, name)
        try:
            shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.unlink(path)
        except OSError:
            continue
        removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
