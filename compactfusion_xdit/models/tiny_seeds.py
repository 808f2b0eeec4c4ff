"""The seed papers' video and audio models as tiny pipelines: Stable Video Diffusion, CogVideoX, AudioLDM2.

    from compactfusion_xdit.models import tiny_seeds
    path = tiny_seeds.materialize("tiny-cogvideox")    # a cached save_pretrained folder (CogVideoXPipeline)
    pipe = tiny_seeds.build_pipeline("tiny-svd")        # StableVideoDiffusionPipeline, random weights

Same rules as `compactfusion_xdit.models.tiny`: every sub-model (text, image and audio encoders,
language model, vocoder, VAE) is built from a config with fixed random weights, no download, and
the folders are cached once per `MODEL_VERSION` under ``$CFX_CACHE``. ParaStep reports its largest
speed-ups on these three (SVD, CogVideoX-2b, AudioLDM2-large) and CompactFusion evaluates CogVideoX;
the stand-ins let every layout run them end to end on a CPU in seconds.

* ``tiny-cogvideox``: CogVideoX-2b's layout (sinusoidal positions, no RoPE, DDIM), 2 blocks of 4
  heads of 8, patch 2, 4 latent channels, VAE 8x spatial / 4x temporal.
* ``tiny-svd``: image-to-video, a spatio-temporal UNet (32/64 channels), a CLIP vision encoder at
  224x224, the temporal-decoder VAE (2x spatial), Euler with Karras sigmas and v-prediction.
  `default_image` is the conditioning image the commands use when none is given.
* ``tiny-audioldm2``: a UNet with two cross-attention streams (GPT-2 hidden states and T5), a CLAP
  text+audio model, a projection model, a HiFi-GAN vocoder at 16 kHz, DDIM.
"""

from __future__ import annotations

from typing import Callable

import torch

from compactfusion_xdit.models import tiny

MODEL_VERSION = 1
#: Sample rate of tiny-audioldm2's vocoder (Hz).
AUDIO_SAMPLE_RATE = 16000


def _cogvideox():
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel

    transformer = CogVideoXTransformer3DModel(num_attention_heads=4, attention_head_dim=8, in_channels=4, out_channels=4,
                                              time_embed_dim=16, text_embed_dim=32, num_layers=2, sample_width=4,
                                              sample_height=4, sample_frames=9, patch_size=2,
                                              temporal_compression_ratio=4, max_text_seq_length=16)
    vae = AutoencoderKLCogVideoX(down_block_types=("CogVideoXDownBlock3D",) * 4, up_block_types=("CogVideoXUpBlock3D",) * 4,
                                 block_out_channels=(8, 8, 8, 8), latent_channels=4, layers_per_block=1,
                                 norm_num_groups=2, temporal_compression_ratio=4)
    return CogVideoXPipeline(tokenizer=tiny._t5_tokenizer(), text_encoder=tiny._t5_encoder(), vae=vae,
                             transformer=transformer, scheduler=CogVideoXDDIMScheduler())


def _svd():
    from diffusers import (AutoencoderKLTemporalDecoder, EulerDiscreteScheduler, StableVideoDiffusionPipeline,
                           UNetSpatioTemporalConditionModel)
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    # the resnets' group norms have 32 groups: channel counts are multiples of 32
    unet = UNetSpatioTemporalConditionModel(sample_size=16, in_channels=8, out_channels=4,
                                            down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
                                            up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
                                            block_out_channels=(32, 64), addition_time_embed_dim=8,
                                            projection_class_embeddings_input_dim=24, layers_per_block=1,
                                            cross_attention_dim=32, num_attention_heads=(2, 4), num_frames=4)
    vae = AutoencoderKLTemporalDecoder(down_block_types=("DownEncoderBlock2D",) * 2, block_out_channels=(32, 32),
                                       layers_per_block=1, latent_channels=4)
    # the pipeline resizes the conditioning image to 224x224 for the encoder: 4x4 patches of 56
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=32, projection_dim=32, num_hidden_layers=1,
                                                             num_attention_heads=4, intermediate_size=37,
                                                             image_size=224, patch_size=56))
    scheduler = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                       prediction_type="v_prediction", sigma_max=700.0, sigma_min=0.002,
                                       steps_offset=1, timestep_spacing="leading", timestep_type="continuous",
                                       interpolation_type="linear", use_karras_sigmas=True)
    return StableVideoDiffusionPipeline(vae=vae, image_encoder=encoder, unet=unet, scheduler=scheduler,
                                        feature_extractor=CLIPImageProcessor(crop_size=224, size={"shortest_edge": 224}))


def _audioldm2():
    from diffusers import AudioLDM2Pipeline, AutoencoderKL, DDIMScheduler
    from diffusers.pipelines.audioldm2 import AudioLDM2ProjectionModel, AudioLDM2UNet2DConditionModel
    from transformers import (ClapConfig, ClapFeatureExtractor, ClapModel, GPT2Config, GPT2LMHeadModel,
                              RobertaTokenizer, SpeechT5HifiGan, SpeechT5HifiGanConfig, T5Tokenizer)

    # cross-attention streams: GPT-2's generated hidden states (32) and T5's (32)
    unet = AudioLDM2UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4,
                                         down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                         up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), block_out_channels=(16, 32),
                                         layers_per_block=1, norm_num_groups=8, cross_attention_dim=(32, 32),
                                         attention_head_dim=8)
    vae = AutoencoderKL(in_channels=1, out_channels=1, down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16], layers_per_block=1,
                        latent_channels=4, norm_num_groups=8)
    text = dict(vocab_size=64, hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
                max_position_embeddings=80, pad_token_id=1, bos_token_id=0, eos_token_id=2, projection_dim=32)
    audio = dict(spec_size=64, window_size=4, num_mel_bins=64, depths=[1, 1], num_attention_heads=[2, 2],
                 patch_embeds_hidden_size=16, hidden_size=32, projection_dim=32, patch_stride=4, patch_size=4,
                 enable_fusion=False)
    clap = ClapModel(ClapConfig(text_config=text, audio_config=audio, projection_dim=32))
    language_model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_head=4, n_layer=1, vocab_size=64, n_positions=64,
                                                bos_token_id=0, eos_token_id=0, max_new_tokens=4))
    projection = AudioLDM2ProjectionModel(text_encoder_dim=32, text_encoder_1_dim=32, langauge_model_dim=32)
    # 16 mel bins (a multiple of the VAE's 2x), 16 samples per mel frame
    vocoder = SpeechT5HifiGan(SpeechT5HifiGanConfig(model_in_dim=16, sampling_rate=AUDIO_SAMPLE_RATE,
                                                    upsample_initial_channel=16, upsample_rates=[4, 4],
                                                    upsample_kernel_sizes=[8, 8], resblock_kernel_sizes=[3],
                                                    resblock_dilation_sizes=[[1, 3]], normalize_before=False))
    # the pipeline type-checks its tokenizers (RoBERTa pads to max length, T5 to the longest prompt);
    # a BPE without merges and a unigram over the word list round-trip through save_pretrained
    roberta = RobertaTokenizer(vocab={w: i for i, w in enumerate(["<s>", "<pad>", "</s>", "<unk>", "<mask>"] + tiny._WORDS)},
                               merges=[], unk_token="<unk>", model_max_length=16)
    t5 = T5Tokenizer(vocab=[(w, 0.0) for w in tiny._T5_SPECIALS] + [(w, -1.0) for w in tiny._WORDS], unk_token="<unk>",
                     eos_token="</s>", pad_token="<pad>", model_max_length=16, extra_ids=0)
    features = ClapFeatureExtractor(feature_size=64, sampling_rate=AUDIO_SAMPLE_RATE, hop_length=160, max_length_s=1)
    return AudioLDM2Pipeline(vae=vae, text_encoder=clap, text_encoder_2=tiny._t5_encoder(), projection_model=projection,
                             language_model=language_model, tokenizer=roberta, tokenizer_2=t5, feature_extractor=features,
                             unet=unet, scheduler=DDIMScheduler(), vocoder=vocoder)


def default_image(height: int = 32, width: int = 32):
    """The conditioning image of image-to-video runs that give none: a fixed RGB gradient (PIL)."""
    from PIL import Image

    y = torch.linspace(0, 1, height)[:, None].expand(height, width)
    x = torch.linspace(0, 1, width)[None, :].expand(height, width)
    rgb = torch.stack([y, x, (x + y) / 2], dim=-1)
    return Image.fromarray((rgb * 255).round().to(torch.uint8).numpy())


_BUILDERS: dict[str, Callable] = {"tiny-svd": _svd, "tiny-cogvideox": _cogvideox, "tiny-audioldm2": _audioldm2}
_FAMILY = tiny.Family(_BUILDERS, MODEL_VERSION)
NAMES: tuple[str, ...] = _FAMILY.names
build_pipeline, cached_path, materialize = _FAMILY.build_pipeline, _FAMILY.cached_path, _FAMILY.materialize
