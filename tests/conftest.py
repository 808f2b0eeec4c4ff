"""Fixtures shared across the test folders (one folder per layer of the package)."""

from __future__ import annotations

import pytest


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
