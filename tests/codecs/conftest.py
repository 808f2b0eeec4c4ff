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
