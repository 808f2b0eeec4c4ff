"""Shared by the codec tests."""

import threading

import pytest

from compactfusion_xdit.codecs.cpu import _loader


@pytest.fixture
def fresh_loader(monkeypatch) -> None:
    """The compiled-codec loader's state as in a new process (restored after the test)."""
    for name, value in (("_module", None), ("_built", None), ("_error", None), ("_thread", None),
                        ("_cached", False), ("_decided", False), ("_done", threading.Event())):
        monkeypatch.setattr(_loader, name, value)


@pytest.fixture(scope="module")
def compiled():
    """The compiled CPU codecs, built if needed (a cold numba cache compiles for about a minute)."""
    import importlib.util

    from compactfusion_xdit.codecs import cpu

    if importlib.util.find_spec("numba") is None:
        pytest.skip("numba is not installed")
    assert cpu.ensure_compiled(timeout=600), cpu.status()
    return cpu


@pytest.fixture
def cpu_kernels_env(monkeypatch):
    """The environment of a user's process: the compiled path on (its default), nothing forced."""
    for name in ("CFX_CPU_KERNELS", "CFX_FORCE_TORCH", "TRITON_INTERPRET"):
        monkeypatch.delenv(name, raising=False)
