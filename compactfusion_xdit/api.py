"""Python API: one call installs the plugin; `xDiTParallel` mirrors xfuser's with ``compression=``.

    import compactfusion_xdit
    compactfusion_xdit.install("residual-int4")          # first line of an xfuser script: every rank

    # or, in place of xfuser.parallel.xDiTParallel(pipe, engine_config, input_config):
    paral = compactfusion_xdit.xDiTParallel(pipe, engine_config, input_config, compression="residual-int4")
    paral(height=1024, width=1024, prompt="a cat", num_inference_steps=28, generator=g)
    paral.stats()      # this rank's bytes (raw/sent per path); paral.traffic(): summed over ranks

`install` must come before ``engine_args.create_config()`` where that call needs our CPU/gloo support
(no CUDA) or where PipeFusion's groups are built; `xDiTParallel` installs too, which is enough for the
Ulysses and ring paths on CUDA when nothing was installed before.
"""

from __future__ import annotations

from typing import Any

from compactfusion_xdit import envs


def install(compression: Any = "none", **options: Any):
    """Install the xfuser patches in this process with `compression` (a name such as
    ``"residual-int4"``, ``"auto"`` (per path from the measured link) or a `CompressionConfig`;
    `options`: ``warmup=``, ``paths=``, ``error_feedback=``, ``check=``, ``auto_floor=``, ``auto_every=``). Returns the `CompressionSession` (None for ``"none"``).
    Call it in every rank before the model is built."""
    from compactfusion_xdit import patches
    from compactfusion_xdit.core.config import CompressionConfig

    patches.install(CompressionConfig.parse(compression, **options))
    return patches.session()


def uninstall() -> None:
    """Undo `install`: every replaced xfuser attribute restored."""
    from compactfusion_xdit import patches

    patches.uninstall()


def install_from_env() -> Any:
    """`install` with the compression named in ``$CFX_COMPRESSION`` (default none)."""
    return install(envs.get(envs.COMPRESSION) or "none")


class xDiTParallel:  # noqa: N801 - the name of the class it mirrors
    """``xfuser.parallel.xDiTParallel`` with compressed communication.

    The same constructor and call as xfuser's, plus ``compression=`` (and `install`'s options).
    Each call is one request: the plugin's caches start empty and are dropped when it returns.
    """

    def __init__(self, pipe: Any, engine_config: Any, input_config: Any, compression: Any = "none",
                 **options: Any) -> None:
        self.session = install(compression, **options)
        from compactfusion_xdit.patches.parallel_api import build_xdit_parallel

        self._parallel = build_xdit_parallel(pipe, engine_config, input_config)
        if self.session is not None:
            self.session.end_request()  # the warm-up run of prepare_run is not a request
            self.session.reset_stats()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.session is None:
            return self._parallel(*args, **kwargs)
        self.session.begin_request(shape=tuple(kwargs.get(k) for k in ("height", "width", "num_inference_steps")))
        try:
            return self._parallel(*args, **kwargs)
        finally:
            self.session.end_request()  # no cache entry outlives its request

    @property
    def pipe(self) -> Any:
        return self._parallel.pipe

    @property
    def config(self) -> Any:
        return self._parallel.config

    @property
    def result(self) -> Any:
        return self._parallel.result

    def save(self, directory: str, prefix: str) -> None:
        self._parallel.save(directory, prefix)

    def stats(self) -> dict:
        """This rank's counters since construction: raw/sent bytes, ratio, per path, caches held."""
        if self.session is None:
            return {"compression": "none", "raw_bytes": 0, "sent_bytes": 0, "ratio": 1.0, "paths": {}}
        return self.session.stats()

    def traffic(self) -> dict:
        """Bytes summed over every rank (a collective: call it on all ranks)."""
        from compactfusion_xdit.rank.traffic import compression_traffic

        return compression_traffic(self.session)
