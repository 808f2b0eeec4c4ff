"""Real xfuser 0.7.0 on a machine without CUDA: importable, gloo, sequence parallel, ring attention.

Everything here applies only where ``torch.cuda.is_available()`` is False, except the yunchang
``update_npu_out`` shim (see ``_shim_update_npu_out``), which only defines a name that is missing
on every device. Two parts:

* ``make_xfuser_importable()`` -- import-time fixes, applied once per process, before ``import
  xfuser`` (it then imports xfuser itself). They make the modules what they would be on a CUDA
  machine, so they are not undone by ``uninstall()``.
* ``apply(patcher)`` -- run-time replacements recorded in an ``AttributePatcher`` (restored by
  ``compactfusion_xdit.patches.uninstall()``): gloo as the distributed backend and an attention
  function that returns the true log-sum-exp, which ring attention needs to merge partial results.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from types import ModuleType

import torch

from compactfusion_xdit.patches._attrs import AttributePatcher
from compactfusion_xdit.patches._import_fixes import ModuleExecHooks


def cuda_available() -> bool:
    return torch.cuda.is_available()


# --------------------------------------------------------------------------------------------
# Import-time fixes
# --------------------------------------------------------------------------------------------


class _ImportState:
    """Whether the import-time fixes ran in this process (they run once)."""

    def __init__(self) -> None:
        self.done = False


_IMPORT_STATE = _ImportState()


def make_xfuser_importable() -> None:
    """Make ``import xfuser`` work and behave as with CUDA present; imports xfuser. Idempotent.

    Must run before anything imports xfuser on a machine without CUDA: xfuser copies its
    environment checks into module constants at import time.
    """
    if _IMPORT_STATE.done:
        return
    _shim_update_npu_out()
    if not cuda_available():
        already = [name for name in ("xfuser.envs", "xfuser.model_executor.layers.usp") if name in sys.modules]
        if already:
            raise RuntimeError(
                f"{already[0]} was imported before compactfusion_xdit.patches.cpu_gloo."
                "make_xfuser_importable(); call it (or patches.install()) before importing xfuser"
            )
        hooks = _cpu_import_hooks()
        hooks.activate()
        try:
            import xfuser  # noqa: F401
            import xfuser.core.long_ctx_attention.ring  # noqa: F401  (lazy in xfuser; fixed here)
        finally:
            hooks.deactivate()
    _IMPORT_STATE.done = True


def _shim_update_npu_out() -> None:
    """xfuser 0.7.0's ``core/long_ctx_attention/ring/ring_npu_flash_attn.py`` imports
    ``update_npu_out`` from ``yunchang.ring.utils``, which yunchang 0.6.4 does not define, so
    ``xfuser.core.long_ctx_attention.ring`` cannot be imported (on CUDA too). We define the name;
    it is only called on Ascend NPUs, and raises if it ever is."""
    import yunchang.ring.utils as ring_utils

    if hasattr(ring_utils, "update_npu_out"):
        return

    def update_npu_out(*args, **kwargs):
        raise NotImplementedError("yunchang 0.6.4 has no update_npu_out (Ascend NPU ring attention)")

    ring_utils.update_npu_out = update_npu_out


def _cpu_import_hooks() -> ModuleExecHooks:
    hooks = ModuleExecHooks()
    hooks.add("xfuser.envs", after=_fix_envs)
    hooks.add("xfuser.core.sparge_attention.block_mask", before=_lend_triton_stub, after=_take_back_triton_stub)
    for name in (
        "xfuser.model_executor.layers.usp",
        "xfuser.core.sparge_attention.head_balance",
        "xfuser.core.distributed.fp8_comms",
    ):
        hooks.add(name, after=_use_yunchang_process_group)
    hooks.add("xfuser.model_executor.layers.usp_legacy", after=_fix_usp_legacy)
    hooks.add("xfuser.core.long_ctx_attention.hybrid.attn_layer", after=_fix_long_ctx_attn_layer)
    hooks.add("xfuser.core.long_ctx_attention.ring.ring_flash_attn", before=_take_cuda_branch, after=_end_cuda_branch)
    hooks.add("xfuser.core.long_ctx_attention.ring.ring_npu_flash_attn", before=_take_cuda_branch, after=_end_cuda_branch)
    return hooks


def _yunchang_long_ctx_available() -> bool:
    try:
        from yunchang import LongContextAttention, UlyssesAttention, set_seq_parallel_pg  # noqa: F401
    except ImportError:
        return False
    return True


def _fix_envs(envs: ModuleType) -> None:
    """``envs.get_device_version()`` raises without an accelerator, and ``config.py`` evaluates
    ``envs.CUDA_VERSION`` (which calls it) at import: report no version instead. The package
    check ``check_long_ctx_attn()`` is False without CUDA, which copies ``HAS_LONG_CTX_ATTN =
    False`` into six modules and keeps the sequence-parallel groups from being built: set it from
    whether yunchang is importable, as the check does on CUDA."""
    raising = envs.get_device_version

    def get_device_version():
        try:
            return raising()
        except NotImplementedError:
            return None

    envs.get_device_version = get_device_version
    envs.PACKAGES_CHECKER.packages_info["has_long_ctx_attn"] = _yunchang_long_ctx_available()


class _MissingTriton:
    """Stands in for a Triton object while xfuser's sparge block-mask module is imported."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> "_MissingTriton":
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _MissingTriton(f"{self._name}.{attr}")

    def __getitem__(self, grid) -> "_MissingTriton":
        return self

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"{self._name} needs Triton, which is not installed (xfuser sparge attention)")


def _triton_stub_modules() -> dict[str, ModuleType]:
    def jit(fn=None, **kwargs):
        if fn is None:
            return lambda f: _MissingTriton(f"triton kernel {f.__name__}")
        return _MissingTriton(f"triton kernel {fn.__name__}")

    triton = ModuleType("triton")
    triton.__doc__ = "compactfusion_xdit stand-in: Triton is not installed"
    triton.jit = jit
    triton.autotune = triton.heuristics = lambda *a, **k: jit
    triton.__getattr__ = _MissingTriton("triton").__getattr__
    language = ModuleType("triton.language")
    language.__getattr__ = _MissingTriton("triton.language").__getattr__
    triton.language = language
    return {"triton": triton, "triton.language": language}


_NOT_LOADED = object()


def _lend_triton_stub(module: ModuleType) -> None:
    """``core/sparge_attention/block_mask.py`` has a module-level ``import triton`` that xfuser
    does not declare; Triton is CUDA-only. Its kernels are only used by sparge attention backends.
    Where Triton is missing we lend stand-in modules for the duration of that one module's import
    (so nothing else sees a fake Triton); calling one of its kernels raises a clear error."""
    try:
        missing = importlib.util.find_spec("triton") is None
    except (ImportError, ValueError):
        missing = True
    if not missing:
        return
    stubs = _triton_stub_modules()
    module.__dict__["_cfx_triton_lent"] = {name: sys.modules.get(name, _NOT_LOADED) for name in stubs}
    sys.modules.update(stubs)


def _take_back_triton_stub(module: ModuleType) -> None:
    for name, previous in module.__dict__.pop("_cfx_triton_lent", {}).items():
        if previous is _NOT_LOADED:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = previous


def _use_yunchang_process_group(module: ModuleType) -> None:
    """``if torch.cuda.is_available(): from yunchang.globals import PROCESS_GROUP else:
    PROCESS_GROUP = None`` -- take the CUDA branch. yunchang's PROCESS_GROUP is a singleton that
    ``initialize_model_parallel`` fills in later, so binding it now is what CUDA does."""
    from yunchang.globals import PROCESS_GROUP

    module.PROCESS_GROUP = PROCESS_GROUP


def _fix_usp_legacy(module: ModuleType) -> None:
    from yunchang.ring.ring_flash_attn import ring_flash_attn_forward
    from yunchang.ring.ring_pytorch_attn import ring_pytorch_attn_func

    _use_yunchang_process_group(module)
    module.ring_flash_attn_forward = ring_flash_attn_forward
    module.ring_pytorch_attn_func = ring_pytorch_attn_func


def _rebased(cls: type, base: type) -> type:
    """``cls`` was defined on ``object`` (the CPU branch's stand-in base); return a subclass of
    ``(cls, base)`` with the same name. Its MRO puts ``base`` right after ``cls``, so the zero-arg
    ``super()`` calls inside ``cls`` reach ``base`` as they would have."""

    def body(ns: dict) -> None:
        ns.update(__module__=cls.__module__, __qualname__=cls.__qualname__, __doc__=cls.__doc__)

    return types.new_class(cls.__name__, (cls, base), exec_body=body)


def _fix_long_ctx_attn_layer(module: ModuleType) -> None:
    """Without CUDA, ``hybrid/attn_layer.py`` sets ``LongContextAttention = object`` and defines
    ``xFuserLongContextAttention`` (and its Sana subclass) on it. Bind yunchang's names and
    rebase the classes on the real ``LongContextAttention`` (used by the legacy StepVideo/Sana
    path)."""
    from yunchang import LongContextAttention
    from yunchang.comm.all_to_all import SeqAllToAll4D
    from yunchang.globals import HAS_SPARSE_SAGE_ATTENTION
    from yunchang.kernels import AttnType

    module.LongContextAttention = LongContextAttention
    module.AttnType = AttnType
    module.SeqAllToAll4D = SeqAllToAll4D
    module.HAS_SPARSE_SAGE_ATTENTION = HAS_SPARSE_SAGE_ATTENTION
    if LongContextAttention not in module.xFuserLongContextAttention.__mro__:
        module.xFuserLongContextAttention = _rebased(module.xFuserLongContextAttention, LongContextAttention)
        module.xFuserSanaLinearLongContextAttention = _rebased(
            module.xFuserSanaLinearLongContextAttention, module.xFuserLongContextAttention
        )


def _take_cuda_branch(module: ModuleType) -> None:
    """``ring/ring_flash_attn.py`` and ``ring/ring_npu_flash_attn.py`` guard their yunchang imports
    with ``if torch.cuda.is_available() or envs._is_npu():`` and, on the CPU branch, fail at import
    time (``AttnType = None`` is read in default arguments; autograd functions are built on
    ``object``; the NPU module's stand-in is misspelt). We import what that branch imports first,
    then let ``envs._is_npu()`` answer True for the duration of this one module's body so the
    branch is taken; ``_end_cuda_branch`` puts ``_is_npu`` back. Everything the body
    imports is already loaded by then (xfuser, yunchang), so nothing else sees the answer."""
    import yunchang.kernels  # noqa: F401
    import yunchang.ring.ring_flash_attn  # noqa: F401
    import yunchang.ring.ring_npu_flash_attn  # noqa: F401
    import yunchang.ring.utils  # noqa: F401
    import xfuser.envs as envs

    module.__dict__["_cfx_is_npu"] = envs.__dict__["_is_npu"]
    envs._is_npu = lambda: True


def _end_cuda_branch(module: ModuleType) -> None:
    import xfuser.envs as envs

    envs._is_npu = module.__dict__.pop("_cfx_is_npu")


# --------------------------------------------------------------------------------------------
# Run-time replacements
# --------------------------------------------------------------------------------------------


def cpu_flash_attention_with_lse(query, key, value, dropout_p=0.0, is_causal=False, attention_kwargs=None):
    """Attention on CPU tensors that returns ``(out, logsumexp)``; layout (b, h, s, d), lse (b, h, s).

    ``aten._scaled_dot_product_flash_attention_for_cpu`` returns the true log-sum-exp (yunchang's
    TORCH_MATH returns zeros for it and xfuser's SDPA returns None), which is what ring attention
    needs to merge partial outputs."""
    attn_mask = (attention_kwargs or {}).get("attn_mask")
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, dropout_p, is_causal, attn_mask=attn_mask
    )
    return out, lse


def apply(patcher: AttributePatcher) -> None:
    """Run-time CPU/gloo replacements; nothing is replaced where CUDA is available."""
    if cuda_available():
        return
    make_xfuser_importable()
    import xfuser.envs as envs
    from xfuser.core.distributed import attention_backend, runtime_state

    patcher.replace(envs, "get_torch_distributed_backend", _gloo_when_no_accelerator(envs.get_torch_distributed_backend))

    # Ring attention (usp.ring_attn -> torch's _templated_ring_attention) merges per-block
    # outputs by their lse. xfuser's default CPU backend (SDPA) returns lse=None and is refused
    # for ring_degree > 1; its SDPA_FLASH calls a CUDA-only aten op. Give SDPA_FLASH a CPU
    # implementation and make it the automatic choice on CPU (every path, so one process and
    # N ranks use the same kernel).
    registry = attention_backend.ATTENTION_FUNCTION_REGISTRY
    flash = attention_backend.AttentionBackendType.SDPA_FLASH
    patcher.replace_item(registry, flash, _on_cpu_tensors(cpu_flash_attention_with_lse, registry[flash]))
    select = runtime_state.RuntimeState.__dict__["_select_attention_backend"]
    patcher.replace(runtime_state.RuntimeState, "_select_attention_backend", _prefer_lse_backend_on_cpu(select, attention_backend))


def _gloo_when_no_accelerator(get_backend):
    """``envs.get_torch_distributed_backend()`` raises NotImplementedError without an accelerator;
    ``create_config()`` -> ``init_distributed_environment()`` and ``initialize_model_parallel()``
    call it with no backend given. Answer "gloo" there."""

    def get_torch_distributed_backend() -> str:
        try:
            return get_backend()
        except NotImplementedError:
            return "gloo"

    return get_torch_distributed_backend


def _on_cpu_tensors(cpu_fn, other_fn):
    def attention_call(query, key, value, dropout_p=0.0, is_causal=False, attention_kwargs=None):
        fn = cpu_fn if query.device.type == "cpu" else other_fn
        return fn(query, key, value, dropout_p=dropout_p, is_causal=is_causal, attention_kwargs=attention_kwargs)

    return attention_call


def _prefer_lse_backend_on_cpu(select, attention_backend):
    sdpa = attention_backend.AttentionBackendType.SDPA
    flash = attention_backend.AttentionBackendType.SDPA_FLASH

    def _select_attention_backend(self, engine_config=None):
        chosen = select(self, engine_config)
        explicit = engine_config is not None and engine_config.runtime_config.attention_backend
        return flash if chosen is sdpa and not explicit else chosen

    return _select_attention_backend
