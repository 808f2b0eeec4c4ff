"""Whether this process codes CPU tensors with the compiled kernels: decided once, at its first call.

numba compiles the kernels in about a minute (once per machine and kernel version: `cache=True`
keeps the machine code on disk), then loads them from its cache in about a second. So the first
`kernels()` call of a process decides, for the whole life of the process:
- a marker file says this kernel version is in numba's cache: the kernels are loaded now (the
  call waits for that, at most `LOAD_WAIT_S`) and every later call uses them;
- no marker: a daemon thread runs `_warm` in a subprocess (the compile holds that process's GIL,
  not ours; a file lock makes concurrent ranks compile once) and writes the marker for the
  processes that start later, while this one keeps the torch reference path throughout.
A process never switches paths mid-run on its own (int2/1bit scales may differ between the paths
by one bf16 ulp, so a switch would make runs irreproducible); only `kernels(wait=True)`
(`cpu.ensure_compiled()`, for tests and benchmarks) waits for the compile and then switches this
process to the kernels. Without numba, or when the compile fails, it warns once and the torch path
stays in use.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import platform
import subprocess
import sys
import threading
import warnings

#: How long the first call waits for the kernels to load from numba's cache (about a second when
#: warm). Past it (a slow disk, a stale marker that makes numba compile) the process keeps the
#: torch path; the load goes on in the background for a later `ensure_compiled()`.
LOAD_WAIT_S = 10.0

_lock = threading.Lock()
_done = threading.Event()  # the background work (load or compile) has finished, or failed
_thread: threading.Thread | None = None  # started by the first call: the decision is made
_module = None  # the kernels, once this process uses them
_built = None  # the kernels, loaded by the background thread (not yet used unless adopted)
_error: str | None = None
_cached = False  # the marker was there when the background work started
_decided = False  # the first kernels() call has fixed this process's path


def kernels(wait: bool = False, timeout: float | None = None):
    """The kernel module when this process uses the compiled path, else None.

    The first call decides (see the module doc). wait: wait for a compile still running and
    then use the kernels from here on (None if it failed or `timeout` passed)."""
    global _module
    if _module is not None:
        return _module
    if _error is not None:
        return None
    if not _decided:
        _decide()
    if wait and _module is None:
        _done.wait(timeout)
        with _lock:
            if _module is None and _done.is_set() and _error is None:
                _module = _built if _built is not None else _load()
    return _module


def status() -> str:
    """'ready', 'compiling', 'torch for this process (compiled for later ones)',
    'unavailable: <why>' or 'not started'."""
    if _module is not None:
        return "ready"
    if _error is not None:
        return f"unavailable: {_error}"
    if _thread is None:
        return "not started"
    return "torch for this process (compiled for later ones)" if _done.is_set() else "compiling"


def prefetch() -> None:
    """Start loading (or compiling) the kernels in the background now, so that the first
    `kernels()` call, which still decides, finds them loaded (a rank calls this while it builds
    its model)."""
    _start()


def _start() -> None:
    global _thread, _cached
    with _lock:
        if _thread is not None or _error is not None:
            return
        missing = [m for m in ("numba", "llvmlite") if importlib.util.find_spec(m) is None]
        if missing:
            _fail(f"{' and '.join(missing)} not installed (pip install numba)")
            return
        try:
            _cached = os.path.exists(_marker())
        except Exception as err:  # noqa: BLE001 - numba that does not import: keep the torch path
            _fail(f"{type(err).__name__}: {err}")
            return
        _thread = threading.Thread(target=_prepare, name="cfx-cpu-codec-compile", daemon=True)
        _thread.start()


def _decide() -> None:
    """The first call: start the background load or compile if `prefetch` did not; adopt the
    kernels if the marker was there and they load in time. Final for this process."""
    global _module, _decided
    _start()
    if _cached and _done.wait(LOAD_WAIT_S):
        with _lock:
            if _module is None and _built is not None:
                _module = _built
    _decided = True


def _fail(why: str) -> None:
    global _error
    _error = why
    _done.set()
    warnings.warn(f"compactfusion_xdit: compiled CPU codecs unavailable ({why}); the torch reference "
                  "path codes CPU tensors (the same payloads, several times slower)", RuntimeWarning, stacklevel=4)


def _marker() -> str:
    """A file that exists once this kernel source, numba and Python have been compiled into the cache.
    The key covers _kernels.py (the kernels) and _warm.py (which specialisations are compiled)."""
    import numba

    from . import _warm

    here = os.path.dirname(os.path.abspath(__file__))
    parts = []
    for name in ("_kernels.py", "_warm.py"):
        src = os.path.join(here, name)
        st = os.stat(src)
        parts += [src, str(st.st_mtime_ns), str(st.st_size)]
    key = "|".join(parts + [numba.__version__, sys.version, platform.machine(), platform.processor(),
                            os.environ.get("NUMBA_CACHE_DIR", "")])
    return os.path.join(_warm.state_dir(), f"cpu-codecs-{hashlib.sha1(key.encode()).hexdigest()[:16]}.ok")


def _compile_in_subprocess() -> None:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run([sys.executable, "-m", "compactfusion_xdit.codecs.cpu._warm"], env=env,
                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"the numba compile failed (exit {proc.returncode}): {proc.stderr.strip()[-600:]}")


def _load():
    """Import the kernels and load the block entry points from numba's cache (the rest load at
    their first call: a process that only exchanges never pays for them)."""
    from . import _kernels, _warm

    _warm.touch_entry_points(_kernels)
    return _kernels


def _prepare() -> None:
    """The background thread: with the marker, load the kernels in-process; without it, compile
    them in a subprocess and write the marker (this process does not load them: it stays on the
    torch path unless `kernels(wait=True)` adopts them)."""
    global _built
    try:
        marker = _marker()
        if os.path.exists(marker):
            _built = _load()
        else:
            try:
                _compile_in_subprocess()
            except OSError:  # no subprocess here: compile in-process (this thread)
                _built = _load()
            try:
                open(marker, "w").close()
            except OSError:
                pass
        _done.set()
    except Exception as err:  # noqa: BLE001 - any failure means: keep the torch path
        _fail(f"{type(err).__name__}: {err}")
