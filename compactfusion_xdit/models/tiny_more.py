"""More tiny pipelines, for the local-folder loading tests: Wan2.1 T2V, HunyuanVideo, PixArt-sigma.

    from compactfusion_xdit.models import tiny_more
    path = tiny_more.materialize("tiny-wan")      # a cached save_pretrained folder (WanPipeline)

Same rules as `compactfusion_xdit.models.tiny`: built from config with fixed random weights, no
download, cached once per `MODEL_VERSION` under ``$CFX_CACHE`` (or ``~/.cache/compactfusion_xdit``).
Each transformer has 4 attention heads. The folders stand in for a user's downloaded model: the
runner and the ``xfuser`` command load them with ``--model <folder>``.
"""

from __future__ import annotations

from typing import Callable


from compactfusion_xdit.models import tiny

MODEL_VERSION = 1


def _wan():
    """Wan2.1 T2V: 2 blocks, 4 heads of 8, patch (1, 2, 2), a T5 encoder, a tiny Wan VAE."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=8,
                                        in_channels=16, out_channels=16, text_dim=32, freq_dim=32, ffn_dim=32,
                                        num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                        rope_max_seq_len=32)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    return WanPipeline(tokenizer=tiny._t5_tokenizer(), text_encoder=tiny._t5_encoder(), vae=vae,
                       transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))


def _hunyuan_video():
    """HunyuanVideo: 1 dual + 1 single block, 4 heads of 8, a 3-layer Llama (the pipeline reads the
    hidden state 2 layers from the top) and a CLIP encoder."""
    from diffusers import (AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline,
                           HunyuanVideoTransformer3DModel)
    from transformers import CLIPTextModel, LlamaConfig, LlamaModel

    transformer = HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=4,
                                                 attention_head_dim=8, num_layers=1, num_single_layers=1,
                                                 num_refiner_layers=1, patch_size=1, patch_size_t=1,
                                                 guidance_embeds=True, text_embed_dim=16, pooled_projection_dim=32,
                                                 rope_axes_dim=(2, 2, 4))
    vae = AutoencoderKLHunyuanVideo(in_channels=3, out_channels=3, latent_channels=4,
                                    down_block_types=("HunyuanVideoDownBlock3D",) * 4,
                                    up_block_types=("HunyuanVideoUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8),
                                    layers_per_block=1, act_fn="silu", norm_num_groups=4, scaling_factor=0.476986,
                                    spatial_compression_ratio=8, temporal_compression_ratio=4,
                                    mid_block_add_attention=True)
    llama = LlamaModel(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=37, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                                   pad_token_id=0, bos_token_id=1, eos_token_id=0))
    llama_tokenizer = tiny._word_tokenizer(tiny._CLIP_SPECIALS, unk_token="<|endoftext|>", bos_token="<|startoftext|>",
                                           eos_token="<|endoftext|>", pad_token="<|endoftext|>", model_max_length=512)
    return HunyuanVideoPipeline(text_encoder=llama, tokenizer=llama_tokenizer, transformer=transformer, vae=vae,
                                scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
                                text_encoder_2=CLIPTextModel(tiny._clip_config()), tokenizer_2=tiny._clip_tokenizer())


def _pixart_sigma():
    """PixArt-sigma: PixArt-alpha's tiny transformer in a PixArtSigmaPipeline."""
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline

    alpha = tiny._pixart()
    return PixArtSigmaPipeline(tokenizer=alpha.tokenizer, text_encoder=alpha.text_encoder, vae=alpha.vae,
                               transformer=alpha.transformer, scheduler=DPMSolverMultistepScheduler())


_BUILDERS: dict[str, Callable] = {"tiny-wan": _wan, "tiny-hunyuan-video": _hunyuan_video,
                                  "tiny-pixart-sigma": _pixart_sigma}
_FAMILY = tiny.Family(_BUILDERS, MODEL_VERSION)
NAMES: tuple[str, ...] = _FAMILY.names
build_pipeline, cached_path, materialize = _FAMILY.build_pipeline, _FAMILY.cached_path, _FAMILY.materialize
