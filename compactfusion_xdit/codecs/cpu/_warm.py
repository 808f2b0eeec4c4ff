"""Compile every specialisation of the CPU codec kernels (numba), filling numba's on-disk cache.

`_loader` runs this as a subprocess the first time a process needs the kernels on a machine
(``python -m compactfusion_xdit.codecs.cpu._warm``), so the compile (tens of seconds, once per
machine and kernel version) never holds the serving process's GIL; a file lock makes concurrent
ranks compile once, the others then load the cache. It exits early if its parent has died.
"""
import contextlib
import os
import sys
import tempfile

import numpy as np


def state_dir() -> str:
    """A per-user folder for the compile lock and the ready marker."""
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    path = os.path.join(tempfile.gettempdir(), f"compactfusion_xdit-{uid}")
    os.makedirs(path, exist_ok=True)
    return path


@contextlib.contextmanager
def compile_lock():
    """An exclusive lock across processes (POSIX flock; none elsewhere)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(os.path.join(state_dir(), "cpu-codecs.lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def touch_all(K, stop=lambda: False) -> None:
    """Call each kernel once per array type the package passes (float32; uint16 bits for fp16,
    int16 bits for bf16), which compiles it or loads it from the cache. Shapes are tiny; results
    are discarded. The block kernels are called on 3-D arrays and through their raw-address entry
    points (the tensor wrappers' route), with the same argument types as the wrappers pass."""
    for dt, kind in ((np.float32, 0), (np.uint16, 1), (np.int16, 2)):
        x = np.zeros((2, 9), dt)
        base = np.zeros((2, 9), dt)
        for bits in (8, 4, 2):
            if stop():
                return
            data = np.zeros((2, -(-9 // (8 // bits))), np.uint8)
            s = np.zeros(2, np.uint16)
            K.row_encode(x, base, data, s, bits, True, True)
            K.row_decode(data, s, base, bits, True)
        if stop():
            return
        data = np.zeros((2, 2), np.uint8)
        m, t = np.zeros(9, np.uint16), np.zeros(2, np.uint16)
        K.onebit_encode(x, base, data, m, t, True, True)
        K.onebit_decode(data, m, t, base, True)
        if stop():
            return
        x3 = np.zeros((2, 2, 9), dt)
        base3 = np.zeros((2, 2, 9), dt)
        out3 = np.zeros((2, 2, 9), dt)
        wire = np.zeros((2, 64), np.uint8)
        for bits in (8, 4, 2, 1):
            K.encode_block(x3, base3, wire, 1, -1, bits, True, True)
            K.decode_block(wire, 1, base3, out3, x3, True, 0, bits, True)
        raw = (x3.ctypes.data, base3.ctypes.data, out3.ctypes.data, wire.ctypes.data)
        K.encode_block_ptr(raw[0], raw[1], raw[3], 2, 2, 9, 64, 1, -1, kind, 4, True, True)
        K.decode_block_ptr(raw[3], raw[1], raw[2], raw[0], 2, 2, 9, 64, 1, 0, kind, 4, True, True)


def touch_entry_points(K) -> None:
    """Load the raw-address block kernels, the ones every coded exchange calls (one specialisation
    each: their arguments are integers); the other kernels load at their first call."""
    x3 = np.zeros((1, 1, 8), np.float32)
    wire = np.zeros((1, 8), np.uint8)
    K.encode_block_ptr(x3.ctypes.data, x3.ctypes.data, wire.ctypes.data, 1, 1, 8, 8, 0, -1, 0, 4, False, True)
    K.decode_block_ptr(wire.ctypes.data, x3.ctypes.data, x3.ctypes.data, x3.ctypes.data, 1, 1, 8, 8, 0, -1, 0, 4,
                       False, False)


def main() -> int:
    parent = os.getppid()
    if hasattr(os, "nice"):
        try:
            os.nice(19)  # a background build: the ranks' work comes first
        except OSError:
            pass
    with compile_lock():
        from compactfusion_xdit.codecs.cpu import _kernels

        touch_all(_kernels, stop=lambda: os.getppid() != parent)
    return 0


if __name__ == "__main__":
    sys.exit(main())
