"""Fixtures shared across the test folders (one folder per layer of the package)."""

from __future__ import annotations

import os

import pytest

# The suite runs the codecs' torch reference path, in this process and in every rank it launches
# (they inherit the environment): a rank on the compiled default would first load numba's kernels
# (about a second each) or, on a fresh machine, start their minute-long build. The compiled path
# has its own tests (tests/codecs/test_cpu_*.py, tests/comm/test_exchange_counts.py), which turn
# it back on.
os.environ.setdefault("CFX_CPU_KERNELS", "0")


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory) -> str:
    """A private model cache with tiny-flux built in it (the launcher reads its config)."""
    from compactfusion_xdit.models import tiny

    path = str(tmp_path_factory.mktemp("cfx-cache"))
    tiny.materialize("tiny-flux", cache_dir=path)
    return path


@pytest.fixture(scope="module")
def tiny_flux() -> str:
    """The built-in tiny Flux, built once into the default cache; its name."""
    from compactfusion_xdit.models import tiny

    tiny.materialize("tiny-flux")
    return "tiny-flux"
