"""When the compiled CPU codecs are ready: a compile in the background, never in a request's way.

numba compiles the kernels in about 10-40 s (once per machine and kernel version: `cache=True`
keeps the machine code on disk), then loads them from its cache in well under a second. The first
`kernels()` call starts a daemon thread and returns None at once (the caller runs the torch
reference, which produces the same decode and caches); the thread
- if a marker says this kernel version is in numba's cache: loads it in-process;
- otherwise runs `_warm` in a subprocess (the compile holds that process's GIL, not ours; a file
  lock makes concurrent ranks compile once), then loads the cache in-process and writes the marker.
From then on `kernels()` returns the module. Without numba, or when the compile fails, it warns
once and the torch path stays in use.
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

_lock = threading.Lock()
_done = threading.Event()
_thread: threading.Thread | None = None
_module = None
_error: str | None = None


def kernels(wait: bool = False, timeout: float | None = None):
    """The compiled kernel module, or None while compiling / when unavailable (wait: block)."""
    if _module is not None:
        return _module
    if _error is not None:
        return None
    _start()
    if wait:
        _done.wait(timeout)
    return _module


def status() -> str:
    if _module is not None:
        return "ready"
    if _error is not None:
        return f"unavailable: {_error}"
    return "compiling" if _thread is not None else "not started"


def _start() -> None:
    global _thread
    with _lock:
        if _thread is not None or _error is not None:
            return
        missing = [m for m in ("numba", "llvmlite") if importlib.util.find_spec(m) is None]
        if missing:
            _fail(f"{' and '.join(missing)} not installed (pip install numba)")
            return
        _thread = threading.Thread(target=_prepare, name="cfx-cpu-codec-compile", daemon=True)
        _thread.start()


def _fail(why: str) -> None:
    global _error
    _error = why
    _done.set()
    warnings.warn(f"compactfusion_xdit: compiled CPU codecs unavailable ({why}); the torch reference "
                  "path codes CPU tensors (the same payloads, several times slower)", RuntimeWarning, stacklevel=4)


def _marker() -> str:
    """A file that exists once this kernel source, numba and Python have been compiled into the cache."""
    import numba

    from . import _warm

    src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_kernels.py")
    st = os.stat(src)
    key = "|".join([src, str(st.st_mtime_ns), str(st.st_size), numba.__version__, sys.version,
                    platform.machine(), platform.processor(), os.environ.get("NUMBA_CACHE_DIR", "")])
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


def _prepare() -> None:
    global _module
    try:
        marker = _marker()
        if not os.path.exists(marker):
            try:
                _compile_in_subprocess()
            except OSError:
                pass  # no subprocess here: the in-process load below compiles
        from . import _kernels, _warm

        _warm.touch_all(_kernels)
        try:
            open(marker, "w").close()
        except OSError:
            pass
        _module = _kernels
        _done.set()
    except Exception as err:  # noqa: BLE001 - any failure means: keep the torch path
        _fail(f"{type(err).__name__}: {err}")
