"""Ray workers of xfuser (``xfuser.ray``: ``RayDiffusionPipeline`` starts one Ray actor per GPU)
get the patches through Ray's worker setup hook.

    import ray, compactfusion_xdit.ray_support as cfx_ray
    ray.init(runtime_env=cfx_ray.runtime_env("residual-int4"))   # before RayDiffusionPipeline.from_pretrained
    pipe = RayDiffusionPipeline.from_pretrained(...)              # every worker process installs the plugin

xfuser calls ``ray.init()`` only when Ray is not initialised yet, so initialising it first with this
runtime environment is the one-line switch. Each worker process runs `setup_worker` when it starts,
before xfuser builds its distributed groups or the model. xfuser's runner and ``xDiTParallel`` do not
use Ray (torchrun ranks).
"""

from __future__ import annotations

from typing import Any

from compactfusion_xdit import api, envs

SETUP_HOOK = "compactfusion_xdit.ray_support.setup_worker"


def runtime_env(compression: str = "residual-int4", base: dict[str, Any] | None = None) -> dict[str, Any]:
    """A Ray ``runtime_env`` (merged into `base`) whose workers install the plugin with `compression`."""
    from compactfusion_xdit.core.config import CompressionConfig

    name = CompressionConfig.parse(compression).name  # a bad name fails here, not in every worker
    env = dict(base or {})
    env["env_vars"] = {**env.get("env_vars", {}), envs.COMPRESSION: name}
    env["worker_process_setup_hook"] = SETUP_HOOK
    return env


def setup_worker() -> None:
    """Ray's worker setup hook: install the plugin with ``$CFX_COMPRESSION``."""
    api.install_from_env()
