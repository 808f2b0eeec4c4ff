"""Where patch parallelism (`compactfusion_xdit.modes.patch_parallel`) meets diffusers and xfuser.

`attach(pipe, mode)` hooks one pipeline (a diffusers pipeline or an xfuser wrapper around one):

* **Tokens**: a forward hook on the backbone's token embedder slices its output to this rank's
  image tokens (Flux: ``x_embedder``; SD3, PixArt: ``pos_embed``, whose positional embedding is
  added for the full image before the slice); Flux's rotary table (``pos_embed``, rows
  ``[text, image]``) keeps the text rows and this rank's image rows, so every token keeps its own
  position. A forward hook on ``proj_out`` all-gathers the output tokens: the backbone's
  unpatchify (which reads the full height/width) and everything after it see all tokens.
  Between the two, the Flux, SD3 and PixArt backbones mix tokens only in attention (norms,
  modulation, MLPs and projections act per token; PixArt's cross-attention reads text only).
* **Attention**: a forward pre-hook on every self/joint attention module (cross-attention modules
  are skipped) marks the next attention kernel call as layer i of the step. The kernels are
  wrapped where the processors call them, and the marked call gets K/V widened to all image
  tokens (`PatchParallel.exchange`):

  - diffusers' ``FluxAttnProcessor`` → ``transformer_flux.dispatch_attention_fn`` (layout B,S,H,D;
    text before image);
  - diffusers' ``JointAttnProcessor2_0`` (SD3; image before text) and ``AttnProcessor2_0``
    (PixArt) → ``attention_processor.F.scaled_dot_product_attention`` (B,H,S,D). ``F`` is replaced
    in that module only, by a proxy of ``torch.nn.functional``;
  - xfuser's processors (used when xfuser wraps the backbone, e.g. with CFG parallel) →
    ``usp._get_attention_function`` (B,H,S,D), replaced in ``usp`` when xfuser is imported.

  Without a mark the wrapped kernels are the originals.
* **Steps**: a forward pre-hook on the backbone (``timestep`` keyword) and a wrapper of
  ``scheduler.set_timesteps`` on the scheduler instance (a new request, its step count).

`Handle.uninstall()` removes every hook and restores every replaced attribute.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import types
from typing import Any

from compactfusion_xdit.patches._attrs import AttributePatcher


@dataclasses.dataclass(frozen=True)
class Adapter:
    """Where a backbone's image tokens enter and leave, and the order of its joint sequence."""

    tokens: str  # submodule whose output is the image token sequence (B, N, C)
    rotary: str | None  # submodule returning per-token rotary tables (rows: text then image)
    text_first: bool  # joint attention sequence is [text, image] (else [image, text])


#: diffusers backbone class name -> adapter (an xfuser wrapper is matched by the class it wraps).
ADAPTERS = {
    "FluxTransformer2DModel": Adapter(tokens="x_embedder", rotary="pos_embed", text_first=True),
    "SD3Transformer2DModel": Adapter(tokens="pos_embed", rotary=None, text_first=False),
    "PixArtTransformer2DModel": Adapter(tokens="pos_embed", rotary=None, text_first=True),
}


class _Mark:
    """The attention layer whose kernel call comes next (None: pass through)."""

    def __init__(self) -> None:
        self.layer: int | None = None
        self.depth = 0

    def take(self) -> int | None:
        layer, self.layer = self.layer, None
        return layer


class Handle:
    """What `attach` installed; `uninstall()` removes it all."""

    def __init__(self, mode: Any) -> None:
        self.mode = mode
        self.patcher = AttributePatcher()
        self.hooks: list[Any] = []
        self.instance_attrs: list[tuple[Any, str]] = []

    def uninstall(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks.clear()
        for owner, name in reversed(self.instance_attrs):
            owner.__dict__.pop(name, None)
        self.instance_attrs.clear()
        self.patcher.restore()


def _backbone(pipe: Any) -> tuple[Any, Adapter]:
    transformer = getattr(pipe, "transformer", None)
    if transformer is None:
        raise ValueError(f"{type(pipe).__name__} has no transformer; patch parallelism supports "
                         f"{', '.join(ADAPTERS)} backbones")
    inner = transformer.__dict__.get("_modules", {}).get("module", transformer)  # xfuser wrapper -> model
    for cls in (*type(inner).__mro__, *type(transformer).__mro__):
        if cls.__name__ in ADAPTERS:
            return transformer, ADAPTERS[cls.__name__]
    raise ValueError(f"patch parallelism does not support the backbone {type(inner).__name__}; "
                     f"supported: {', '.join(ADAPTERS)}")


def attach(pipe: Any, mode: Any) -> Handle:
    """Install `mode` (a `PatchParallel`) on `pipe`; returns the `Handle`."""
    transformer, adapter = _backbone(pipe)
    handle = Handle(mode)
    mark = _Mark()
    try:
        _hook_backbone(handle, transformer, adapter, mode)
        _hook_attention_modules(handle, transformer, mode, mark)
        _wrap_kernels(handle.patcher, mode, mark, adapter.text_first)
        _wrap_set_timesteps(handle, pipe, mode)
    except BaseException:
        handle.uninstall()
        raise
    return handle


def _hook_backbone(handle: Handle, transformer: Any, adapter: Adapter, mode: Any) -> None:
    def before_call(module, args, kwargs):
        mode.begin_call(kwargs.get("timestep"))

    def after_call(module, args, output):
        mode.end_call()

    handle.hooks.append(transformer.register_forward_pre_hook(before_call, with_kwargs=True))
    handle.hooks.append(transformer.register_forward_hook(after_call))
    handle.hooks.append(getattr(transformer, adapter.tokens).register_forward_hook(
        lambda module, args, output: mode.split_tokens(output, dim=1)))
    if adapter.rotary is not None:
        def rotary_rows(module, args, output):
            tables = output if isinstance(output, tuple) else (output,)
            rows = [mode.split_rows(t, t.shape[0] - mode.image_tokens) for t in tables]
            return tuple(rows) if isinstance(output, tuple) else rows[0]

        handle.hooks.append(getattr(transformer, adapter.rotary).register_forward_hook(rotary_rows))
    handle.hooks.append(transformer.proj_out.register_forward_hook(
        lambda module, args, output: mode.gather_tokens(output, dim=1)))


def _hook_attention_modules(handle: Handle, transformer: Any, mode: Any, mark: _Mark) -> None:
    def enter(module, args):
        if mark.depth == 0:  # an xfuser attention wrapper holds the diffusers module: mark once
            mark.layer = mode.next_layer()
        mark.depth += 1

    def leave(module, args, output):
        mark.depth -= 1
        if mark.depth == 0:
            mark.layer = None

    found = 0
    for module in transformer.modules():
        if "processor" not in module.__dict__ and not hasattr(type(module), "processor"):
            continue
        if getattr(module, "is_cross_attention", False):
            continue  # queries are image tokens, keys/values text only: nothing to gather
        handle.hooks.append(module.register_forward_pre_hook(enter))
        handle.hooks.append(module.register_forward_hook(leave))
        found += 1
    if not found:
        raise ValueError(f"patch parallelism found no attention module in {type(transformer).__name__}")


def _wrap_kernels(patcher: AttributePatcher, mode: Any, mark: _Mark, text_first: bool) -> None:
    def widened(key, value, seq_dim):
        layer = mark.take()
        if layer is None:
            return key, value
        return mode.exchange(layer, key, value, seq_dim, text_first)

    from diffusers.models import attention_processor
    from diffusers.models.transformers import transformer_flux

    dispatch = transformer_flux.dispatch_attention_fn

    @functools.wraps(dispatch)
    def dispatch_attention_fn(query, key, value, *args, **kwargs):
        key, value = widened(key, value, seq_dim=1)
        return dispatch(query, key, value, *args, **kwargs)

    patcher.replace(transformer_flux, "dispatch_attention_fn", dispatch_attention_fn)

    functional = attention_processor.F
    sdpa = functional.scaled_dot_product_attention

    @functools.wraps(sdpa)
    def scaled_dot_product_attention(query, key, value, *args, **kwargs):
        if mark.layer is not None and (kwargs.get("attn_mask") is not None or (args and args[0] is not None)):
            raise NotImplementedError("patch parallelism does not support an attention mask on self-attention")
        key, value = widened(key, value, seq_dim=2)
        return sdpa(query, key, value, *args, **kwargs)

    patcher.replace(attention_processor, "F", _FunctionalProxy(functional, scaled_dot_product_attention))

    usp = sys.modules.get("xfuser.model_executor.layers.usp")
    if usp is not None:
        get_function = usp._get_attention_function

        @functools.wraps(get_function)
        def _get_attention_function(*args, **kwargs):
            function = get_function(*args, **kwargs)

            @functools.wraps(function)
            def attention(query, key, value, *f_args, **f_kwargs):
                key, value = widened(key, value, seq_dim=2)
                return function(query, key, value, *f_args, **f_kwargs)

            return attention

        patcher.replace(usp, "_get_attention_function", _get_attention_function)


class _FunctionalProxy(types.ModuleType):
    """``torch.nn.functional`` with one function replaced (installed as one module's ``F``)."""

    def __init__(self, base: types.ModuleType, scaled_dot_product_attention) -> None:
        super().__init__(base.__name__, base.__doc__)
        self._base = base
        self.scaled_dot_product_attention = scaled_dot_product_attention

    def __getattr__(self, name: str):
        return getattr(self._base, name)


def _wrap_set_timesteps(handle: Handle, pipe: Any, mode: Any) -> None:
    scheduler = getattr(pipe, "scheduler", None)
    original = getattr(scheduler, "set_timesteps", None)
    if original is None:
        return

    @functools.wraps(original)  # pipelines inspect its signature (retrieve_timesteps: sigmas=, mu=)
    def set_timesteps(*args, **kwargs):
        result = original(*args, **kwargs)
        begin = getattr(scheduler, "begin_index", None) or 0
        mode.begin_request(len(scheduler.timesteps) - begin)
        return result

    if "set_timesteps" in scheduler.__dict__:
        raise RuntimeError(f"{type(scheduler).__name__}.set_timesteps is already replaced on the instance; "
                           "uninstall the other mode first")
    object.__setattr__(scheduler, "set_timesteps", set_timesteps)  # xfuser's wrapper forwards setattr
    handle.instance_attrs.append((scheduler, "set_timesteps"))
