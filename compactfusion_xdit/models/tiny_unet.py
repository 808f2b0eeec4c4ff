"""Tiny UNet pipelines built from config: ``tiny-sdxl`` (a built-in) and a plain SD-style pipeline.

    from compactfusion_xdit.models import tiny_unet
    pipe = tiny_unet.build_pipeline("tiny-sdxl")     # a diffusers StableDiffusionXLPipeline, random weights
    path = tiny_unet.materialize("tiny-sdxl")         # a cached save_pretrained folder
    sd = tiny_unet.sd_pipeline()                      # StableDiffusionPipeline over a tiny UNet (tests only)

Same rules as `compactfusion_xdit.models.tiny`: no download, fixed weights (seed `tiny.WEIGHT_SEED`),
cached once per `MODEL_VERSION`. The SDXL UNet has what the real one has, small: a down block of
ResNets and a down block with a cross-attention transformer (one 2x down-sampling between them), a
cross-attention mid block, the mirrored up blocks (one 2x up-sampling), GroupNorm (8 groups)
everywhere, SDXL's ``text_time`` added conditioning; two CLIP text encoders (the second with a
projection, giving the pooled embedding) whose 32 + 32 hidden channels make the 64-wide
cross-attention context; the tiny two-block VAE (latent side = image side / 2). 64x64 images
(32x32 latents) run 8 steps in about a second on one CPU thread.
"""

from __future__ import annotations

from typing import Callable

import torch

from compactfusion_xdit.models import tiny

MODEL_VERSION = 1


def _unet(**kwargs):
    """UNet2DConditionModel: channels (32, 64), one ResNet per block, 2 and 4 heads, GroupNorm(8)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(sample_size=32, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                                use_linear_projection=True, norm_num_groups=8, **kwargs)


def _scheduler():
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  steps_offset=1, timestep_spacing="leading")


def _sdxl():
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    # added conditioning: pooled text (32) + 6 size/crop numbers x 8 channels each
    unet = _unet(addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=32 + 6 * 8, cross_attention_dim=64)
    return StableDiffusionXLPipeline(
        vae=tiny._vae(), unet=unet, scheduler=_scheduler(),
        text_encoder=CLIPTextModel(tiny._clip_config()), tokenizer=tiny._clip_tokenizer(),
        text_encoder_2=CLIPTextModelWithProjection(tiny._clip_config()), tokenizer_2=tiny._clip_tokenizer(),
    )


def sd_pipeline(dtype: torch.dtype = torch.float32):
    """A plain SD-style StableDiffusionPipeline (one CLIP encoder, no added conditioning) over the
    same tiny UNet layout; for tests of patch parallelism on UNets outside SDXL (not a built-in)."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(tiny.WEIGHT_SEED)
        pipe = StableDiffusionPipeline(vae=tiny._vae(), unet=_unet(cross_attention_dim=32), scheduler=_scheduler(),
                                       text_encoder=CLIPTextModel(tiny._clip_config()), tokenizer=tiny._clip_tokenizer(),
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


_BUILDERS: dict[str, Callable] = {"tiny-sdxl": _sdxl}
_FAMILY = tiny.Family(_BUILDERS, MODEL_VERSION)
NAMES: tuple[str, ...] = _FAMILY.names
build_pipeline, cached_path, materialize = _FAMILY.build_pipeline, _FAMILY.cached_path, _FAMILY.materialize
