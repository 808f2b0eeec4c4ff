"""Where UNet patch parallelism (`compactfusion_xdit.modes.unet_patch_parallel`) meets diffusers.

`attach(pipe, mode, cfg_parallel)` hooks a pipeline whose ``unet`` is a diffusers
``UNet2DConditionModel`` (``StableDiffusionXLPipeline``, xfuser's ``xFuserStableDiffusionXLPipeline``
wrapper, which forwards attribute reads to it, ``StableDiffusionPipeline``):

* **Bands**: a forward pre-hook on the UNet (``UNet2DConditionModel.forward(sample, timestep, ...)``)
  starts the call (`begin_call`) and refuses a latent height the bands cannot follow through the
  down-samplings. A forward hook on ``conv_in`` keeps this rank's rows of its output (``conv_in``
  runs on the full latent, which every rank holds: exact, nothing exchanged); a forward hook on
  ``conv_out`` all-gathers the rows, so the UNet returns the full noise prediction.
* **Convolutions**: every ``nn.Conv2d`` of the UNet with a kernel taller than one row (but
  ``conv_in``) gets an instance ``forward`` that attaches the halo rows (`UNetPatchParallel.halo`)
  and convolves without row padding (``F.conv2d``, the module's own weight, stride and column
  padding). ``Downsample2D``'s stride-2 convolution needs one row above and none below.
* **GroupNorm**: every ``nn.GroupNorm`` gets an instance ``forward``: band statistics, whole-image
  statistics (`UNetPatchParallel.norm_stats`), then the module's affine transform.
* **Attention**: the self-attention modules (``attn1`` of diffusers' ``BasicTransformerBlock``,
  processor ``AttnProcessor2_0``) are marked and their K/V widened as for DiTs
  (`compactfusion_xdit.patches.patch_mode_hooks`: ``attention_processor.F.scaled_dot_product_attention``);
  cross-attention (``attn2``, ``is_cross_attention``) is left alone.
* **CFG parallel**: xfuser 0.7.0 splits SDXL's guidance batch only in a world of exactly 2 ranks
  (``xfuser.model_executor.patch.unet_patch.apply_unet_cfg_parallel_monkey_patch``); with patch
  ranks the world is larger and xfuser leaves the UNet whole. With `cfg_parallel` the UNet pre-hook
  keeps this rank's half of the batch (rank in xfuser's CFG group: ``get_cfg_group()``) and a
  forward hook all-gathers the halves over that group.
* **Whole warm-up steps** (displaced mode, `UNetPatchParallel.whole_now`): every hook passes the
  whole latent through the stock layer (the class's own ``forward``), so those steps are bitwise one
  process's; the convolution and GroupNorm hooks only keep what the first displaced step needs.
* **Steps**: ``scheduler.set_timesteps`` is wrapped on the instance (a new request).

`Handle.uninstall()` removes every hook and instance attribute and restores every replaced one.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from compactfusion_xdit.patches.patch_mode_hooks import (Handle, _hook_attention_modules, _Mark, _wrap_kernels,
                                                          _wrap_set_timesteps)


def unet_of(pipe: Any) -> Any:
    """The pipeline's ``unet`` (None when it has none)."""
    try:
        return getattr(pipe, "unet", None)
    except AttributeError:  # xfuser's wrapper re-raises lookups it cannot forward
        return None


def downsampling_factor(unet: Any) -> int:
    """2 ** (number of 2x down-samplings): a band's height must divide by it."""
    from diffusers.models.downsampling import Downsample2D

    return 2 ** sum(isinstance(m, Downsample2D) for m in unet.modules())


def attach(pipe: Any, mode: Any, cfg_parallel: bool = False) -> Handle:
    """Install `mode` (a `UNetPatchParallel`) on `pipe`; returns the `Handle`."""
    unet = unet_of(pipe)
    if unet is None or type(unet).__name__ != "UNet2DConditionModel":
        raise ValueError(f"UNet patch parallelism needs a pipeline with a UNet2DConditionModel, got {type(pipe).__name__}")
    if "forward" in unet.__dict__:
        raise RuntimeError("the UNet's forward is already replaced on the instance (xfuser's 2-rank CFG split?); "
                           "patch parallelism cannot hook it")
    handle = Handle(mode)
    mark = _Mark()
    try:
        _check_layers(unet)
        pixels = int(getattr(pipe, "vae_scale_factor", 1) or 1)
        _hook_unet(handle, unet, mode, (downsampling_factor(unet), pixels), _cfg_group() if cfg_parallel else None)
        for module in unet.modules():
            if isinstance(module, torch.nn.GroupNorm):
                _replace_forward(handle, module, _norm_forward(module, mode))
            elif isinstance(module, torch.nn.Conv2d) and module.kernel_size[0] > 1 and module is not unet.conv_in:
                _replace_forward(handle, module, _conv_forward(module, mode))
        _hook_attention_modules(handle, unet, mode, mark)
        _wrap_kernels(handle.patcher, mode, mark, text_first=True)
        _wrap_set_timesteps(handle, pipe, mode)
    except BaseException:
        handle.uninstall()
        raise
    return handle


def _check_layers(unet: Any) -> None:
    for name, module in unet.named_modules():
        kind = type(module).__name__
        if ("GroupNorm" in kind and not isinstance(module, torch.nn.GroupNorm)) or kind in ("SpatialNorm", "Conv3d"):
            raise ValueError(f"UNet patch parallelism does not handle {name} ({kind}); supported: Conv2d, GroupNorm, "
                             "attention (SD / SDXL UNets)")
        if isinstance(module, torch.nn.Conv2d) and module.kernel_size[0] > 1:
            if (module.padding_mode != "zeros" or not isinstance(module.padding, tuple) or module.dilation[0] != 1
                    or module.kernel_size[0] - module.stride[0] - module.padding[0] < 0):
                raise ValueError(f"UNet patch parallelism does not handle the convolution {name} ({module}); "
                                 "supported: zero padding, no dilation")


def _replace_forward(handle: Handle, module: Any, forward) -> None:
    handle.patcher.replace(module, "forward", forward)


def _conv_forward(conv: torch.nn.Conv2d, mode: Any):
    top = conv.padding[0]
    bottom = conv.kernel_size[0] - conv.stride[0] - conv.padding[0]
    padding = (0, conv.padding[1])

    def forward(x: torch.Tensor) -> torch.Tensor:
        if mode.whole_now:
            mode.whole_conv(x, top, bottom)
            return type(conv).forward(conv, x)
        return F.conv2d(mode.halo(x, top, bottom), conv.weight, conv.bias, conv.stride, padding, conv.dilation,
                        conv.groups)

    return forward


def _norm_forward(norm: torch.nn.GroupNorm, mode: Any):
    groups, eps = norm.num_groups, norm.eps

    def forward(x: torch.Tensor) -> torch.Tensor:
        if mode.whole_now:
            mode.whole_norm(lambda: torch.stack([group_moments(band, groups)
                                                 for band in x.split(x.shape[2] // mode.degree, dim=2)]))
            return type(norm).forward(norm, x)
        b, c = x.shape[:2]
        mean, var = mode.norm_stats(group_moments(x, groups))
        scale = torch.rsqrt(var + eps).repeat_interleave(c // groups, dim=1)  # (B, C)
        shift = -mean.repeat_interleave(c // groups, dim=1) * scale
        if norm.affine:
            scale = scale * norm.weight
            shift = torch.addcmul(norm.bias, shift, norm.weight)
        view = (b, c) + (1,) * (x.dim() - 2)
        return torch.addcmul(shift.to(x.dtype).view(view), x, scale.to(x.dtype).view(view))

    return forward


def group_moments(x: torch.Tensor, groups: int) -> torch.Tensor:
    """``(B, G, 2)`` fp32 [mean, variance] of `x` (B, C, ...) per (sample, channel group)."""
    var, mean = torch.var_mean(x.reshape(x.shape[0], groups, -1).float(), dim=-1, correction=0)
    return torch.stack([mean, var], dim=-1)


def _cfg_group() -> tuple[Any, int, int]:
    from xfuser.core.distributed import get_cfg_group

    cfg = get_cfg_group()
    return cfg.device_group, cfg.rank_in_group, cfg.world_size


def _hook_unet(handle: Handle, unet: Any, mode: Any, sizes: tuple[int, int], cfg) -> None:
    def before_call(module, args, kwargs):
        sample = kwargs["sample"] if "sample" in kwargs else args[0]
        mode.band_rows(sample.shape[-2], *sizes)
        timestep = kwargs["timestep"] if "timestep" in kwargs else (args[1] if len(args) > 1 else None)
        if cfg is not None:
            args, kwargs = _cfg_half(args, kwargs, sample.shape[0], cfg)
        mode.begin_call(timestep)
        return args, kwargs

    def after_call(module, args, kwargs, output):
        mode.end_call()
        if cfg is None:
            return output
        return _with_sample(output, _cfg_gather(output[0] if isinstance(output, tuple) else output.sample, cfg))

    handle.hooks.append(unet.register_forward_pre_hook(before_call, with_kwargs=True))
    handle.hooks.append(unet.register_forward_hook(after_call, with_kwargs=True))
    handle.hooks.append(unet.conv_in.register_forward_hook(
        lambda module, args, output: output if mode.whole_now else mode.split_tokens(output, dim=2).contiguous()))
    handle.hooks.append(unet.conv_out.register_forward_hook(
        lambda module, args, output: output if mode.whole_now else mode.gather_tokens(output, dim=2)))


def _cfg_half(args: tuple, kwargs: dict, batch: int, cfg) -> tuple[tuple, dict]:
    """This CFG rank's half of every batched UNet input."""
    _, rank, size = cfg
    if batch % size:
        raise ValueError(f"--use_cfg_parallel splits the UNet batch in {size}, got a batch of {batch}")
    share = batch // size

    def half(x):
        if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == batch:
            return x[rank * share:(rank + 1) * share]
        if isinstance(x, dict):
            return {k: half(v) for k, v in x.items()}
        return x

    return tuple(half(a) for a in args), {k: half(v) for k, v in kwargs.items()}


def _cfg_gather(x: torch.Tensor, cfg) -> torch.Tensor:
    group, _, size = cfg
    x = x.contiguous()
    out = torch.empty((size, *x.shape), dtype=x.dtype, device=x.device)
    dist.all_gather_into_tensor(out, x.unsqueeze(0), group=group)
    return out.flatten(0, 1)


def _with_sample(output: Any, sample: torch.Tensor) -> Any:
    if isinstance(output, tuple):
        return (sample, *output[1:])
    output.sample = sample
    return output
