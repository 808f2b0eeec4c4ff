"""``xfuser.parallel.xDiTParallel`` on CPU ranks.

Its constructor runs the wrapped pipeline's ``prepare_run`` (a 3-step warm-up call) with
``torch.Generator(device="cuda")`` (``"npu"``) built inline, which fails without CUDA. The warm-up
only primes allocations and compilation, so without CUDA it is skipped while the constructor runs;
with CUDA nothing is replaced.
"""

from __future__ import annotations

from typing import Any

from compactfusion_xdit.patches._attrs import AttributePatcher


def build_xdit_parallel(pipe: Any, engine_config: Any, input_config: Any) -> Any:
    """``xfuser.parallel.xDiTParallel(pipe, engine_config, input_config)``, warm-up skipped on CPU."""
    from xfuser.model_executor.pipelines.register import xFuserPipelineWrapperRegister
    from xfuser.parallel import xDiTParallel

    from compactfusion_xdit.patches import cpu_gloo

    patcher = AttributePatcher()
    if not cpu_gloo.cuda_available():
        wrapper_cls = xFuserPipelineWrapperRegister.get_class(pipe)
        patcher.replace(wrapper_cls, "prepare_run", lambda self, *args, **kwargs: None)
    try:
        return xDiTParallel(pipe, engine_config, input_config)
    finally:
        patcher.restore()
