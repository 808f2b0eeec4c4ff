"""xfuser/yunchang/torch internals, patched in one place: ``install()`` / ``uninstall()``.

    from compactfusion_xdit import patches
    patches.install()            # before xfuser builds its config; CPU/gloo support where no CUDA
    ...
    patches.uninstall()          # every replaced attribute restored exactly

On a machine without CUDA, ``install()`` first makes xfuser importable and runnable over gloo
(``cpu_gloo``, ``pipefusion_gloo``). Import-time fixes (``cpu_gloo.make_xfuser_importable``) stay
for the life of the process; run-time replacements are undone by ``uninstall()``. On every machine
``unet_runtime`` lets xfuser's SDXL wrapper run on CFG x data-parallel ranks (patch parallel bands).

Compression: ``install`` builds one `CompressionSession` (config, residual state, communicators)
for the process, available as ``patches.session()``. Each module named in ``COMPRESSION_PATCHES``
provides ``apply(patcher, session)`` and records every replacement in ``patcher``; ``install``
calls them in that order, after the CPU/gloo support, when the config compresses anything.

Counting without compressing: ``install(config, count=True)`` with a config that compresses nothing
(``none``) still builds a session and routes the exchanges of ``COUNTING_PATCHES`` through it, every
message raw, so ``session().stats()`` reports what they send (raw_bytes == sent_bytes). Those are
the paths whose raw route the suite proves bitwise equal to stock xfuser (Ulysses, PipeFusion,
yunchang's legacy exchanges). The ring keeps torch's own ring attention (the compressed one merges
blocks like torch's and matches to 1e-5, not bit for bit by proof); a thin wrapper counts its bytes.
"""

from __future__ import annotations

import importlib
from typing import Any

from compactfusion_xdit.patches._attrs import AttributePatcher

#: One module per xfuser path, applied in this order (missing modules are skipped).
COMPRESSION_PATCHES = ("lifecycle", "ulysses", "ring_attn", "pipefusion", "legacy")
#: The patches a counting-only installation applies (``install(none, count=True)``).
COUNTING_PATCHES = ("lifecycle", "ulysses", "ring_attn", "pipefusion", "legacy")


class _Installation:
    """What ``install()`` replaced in this process, so ``uninstall()`` can put it back."""

    def __init__(self) -> None:
        self.patcher: AttributePatcher | None = None
        self.compression_config: Any = None
        self.count = False
        self.session: Any = None


_INSTALLATION = _Installation()


def install(compression_config: Any = None, count: bool = False) -> None:
    """Apply the CPU/gloo support (where CUDA is unavailable), then the compression patches; with
    `count` and a config that compresses nothing, the counting-only session (see above).

    Idempotent: a second call with the same config and `count` does nothing; otherwise the
    previous installation is undone first."""
    if _INSTALLATION.patcher is not None:
        same = (compression_config is _INSTALLATION.compression_config
                or compression_config == _INSTALLATION.compression_config)
        if same and count == _INSTALLATION.count:
            return
        uninstall()
    from compactfusion_xdit.patches import cpu_gloo, pipefusion_gloo, unet_runtime

    patcher = AttributePatcher()
    try:
        cpu_gloo.apply(patcher)
        pipefusion_gloo.apply(patcher)
        unet_runtime.apply(patcher)  # SDXL on cfg x data (patch parallel) ranks
        enabled = compression_config is not None and getattr(compression_config, "enabled", False)
        if enabled or count:
            names = COMPRESSION_PATCHES if enabled else COUNTING_PATCHES
            modules = [importlib.import_module(f"{__name__}.{name}") for name in names]
            from compactfusion_xdit.core.session import CompressionSession

            session = CompressionSession(compression_config, count_raw=not enabled)
            for module in modules:
                module.apply(patcher, session)
            _INSTALLATION.session = session
    except BaseException:
        patcher.restore()
        raise
    _INSTALLATION.patcher = patcher
    _INSTALLATION.compression_config = compression_config
    _INSTALLATION.count = count


def uninstall() -> None:
    """Restore everything ``install()`` replaced. Safe to call when nothing is installed."""
    if _INSTALLATION.patcher is not None:
        _INSTALLATION.patcher.restore()
    _INSTALLATION.patcher = None
    _INSTALLATION.compression_config = None
    _INSTALLATION.count = False
    _INSTALLATION.session = None


def session():
    """The `CompressionSession` of the current installation (None when compression is off and
    nothing is counted)."""
    return _INSTALLATION.session


def is_installed() -> bool:
    return _INSTALLATION.patcher is not None
