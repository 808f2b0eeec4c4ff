"""Run a selection of xfuser's own installed tests with our patches installed first.

Usage: ``python tests/paths/_xfuser_own_tests_runner.py MODE [pytest args...]`` where MODE is
``none`` (CPU/gloo support only) or ``raw-paths`` (every compression path patch applied,
warm-up never ends, so every message goes raw). Exits with pytest's exit code.
Run as a script in a subprocess: it must install the patches before pytest imports xfuser.
"""

import sys


def _config(mode: str):
    from compactfusion_xdit.core.config import CompressionConfig

    if mode == "none":
        return CompressionConfig.parse("none")
    if mode == "raw-paths":
        return CompressionConfig.parse("residual-int4", warmup=10**6)
    raise SystemExit(f"unknown mode {mode!r}: use 'none' or 'raw-paths'")


def main(argv: list[str]) -> int:
    from compactfusion_xdit.patches import cpu_gloo

    cpu_gloo.make_xfuser_importable()
    from compactfusion_xdit import patches

    patches.install(_config(argv[0]))
    import pytest

    return int(pytest.main(argv[1:]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
