"""Tiny Flux, PixArt-alpha and SD3 pipelines built from config: no download, fixed weights.

    from compactfusion_xdit.models import tiny
    pipe = tiny.build_pipeline("tiny-flux")              # a diffusers FluxPipeline, random weights
    pipe("a cat", height=64, width=64, num_inference_steps=8).images[0]
    path = tiny.materialize("tiny-flux")                  # a cached save_pretrained folder

They exist for tests, CI and the demo: xfuser loads `materialize`'s folder like a real model, so
every parallel layout runs end to end on a laptop CPU. The images are noise-like (random weights);
the point is that the same seed gives the same bits on every layout. Each transformer has 4
attention heads (Ulysses degree 2 or 4 divides them). Text encoders are one-layer CLIP/T5 models
over a word-level tokenizer that knows the letters a-z and a few words.

``digits-flux`` is a built-in too, but trained and shipped with the package (`digits`): for it
`materialize` and `cached_path` return the shipped folder and `build_pipeline` loads it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Callable

import torch

from compactfusion_xdit import envs

#: Bump when a builder changes, so cached folders of older builds are not reused.
MODEL_VERSION = 1
#: Seed of every weight initialisation (components are built in a fixed order under it).
WEIGHT_SEED = 0

_CLIP_SPECIALS = ["<|endoftext|>", "<|startoftext|>"]
_T5_SPECIALS = ["<pad>", "</s>", "<unk>"]
_WORDS = [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["cat", "dog", "the"]


# --------------------------------------------------------------------------------------------
# Components
# --------------------------------------------------------------------------------------------


def _word_tokenizer(specials: list[str], **kwargs):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(specials + _WORDS)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=kwargs["unk_token"]))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **kwargs)


def _clip_tokenizer():
    return _word_tokenizer(_CLIP_SPECIALS, unk_token="<|endoftext|>", bos_token="<|startoftext|>",
                           eos_token="<|endoftext|>", pad_token="<|endoftext|>", model_max_length=77)


def _t5_tokenizer():
    return _word_tokenizer(_T5_SPECIALS, unk_token="<unk>", eos_token="</s>", pad_token="<pad>", model_max_length=512)


def _clip_config():
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=64, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                          num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
                          pad_token_id=0, bos_token_id=1, eos_token_id=0)  # ids of _clip_tokenizer


def _t5_encoder():
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=37, num_layers=1, num_heads=4))


def _vae(**kwargs):
    """Two-block AutoencoderKL: 4 latent channels, image side = 2 x latent side."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                         up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16], layers_per_block=1,
                         latent_channels=4, norm_num_groups=8, **kwargs)


# --------------------------------------------------------------------------------------------
# Pipelines
# --------------------------------------------------------------------------------------------


def _flux():
    """Flux: 2 double-stream + 2 single-stream blocks, 4 heads of 16 (rope axes 4+6+6)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                                         attention_head_dim=16, num_attention_heads=4, joint_attention_dim=32,
                                         pooled_projection_dim=32, axes_dims_rope=[4, 6, 6])
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_vae(use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035),
        text_encoder=CLIPTextModel(_clip_config()), tokenizer=_clip_tokenizer(),
        text_encoder_2=_t5_encoder(), tokenizer_2=_t5_tokenizer(),
        transformer=transformer,
    )


def _pixart():
    """PixArt-alpha: 2 layers, 4 heads of 8, patch 2, a T5 encoder."""
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel

    transformer = PixArtTransformer2DModel(sample_size=32, num_layers=2, patch_size=2, attention_head_dim=8,
                                           num_attention_heads=4, caption_channels=32, in_channels=4,
                                           cross_attention_dim=32, out_channels=8, attention_bias=True,
                                           activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
                                           norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6)
    return PixArtAlphaPipeline(tokenizer=_t5_tokenizer(), text_encoder=_t5_encoder(), vae=_vae(),
                               transformer=transformer, scheduler=DPMSolverMultistepScheduler())


def _sd3():
    """SD3: 2 joint blocks, 4 heads of 8, patch 2, two CLIP encoders with projection and a T5."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    transformer = SD3Transformer2DModel(sample_size=32, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                        num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=32,
                                        pooled_projection_dim=64, out_channels=4)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_vae(shift_factor=0.0609, scaling_factor=1.5035),
        text_encoder=CLIPTextModelWithProjection(_clip_config()), tokenizer=_clip_tokenizer(),
        text_encoder_2=CLIPTextModelWithProjection(_clip_config()), tokenizer_2=_clip_tokenizer(),
        text_encoder_3=_t5_encoder(), tokenizer_3=_t5_tokenizer(),
    )


_BUILDERS: dict[str, Callable] = {"tiny-flux": _flux, "tiny-pixart": _pixart, "tiny-sd3": _sd3}
#: Trained built-ins shipped as diffusers folders inside the package (name -> folder path).
_SHIPPED: dict[str, Callable[[], str]] = {"digits-flux": lambda: _digits().folder()}

#: The names ``--model`` accepts besides a local diffusers folder.
BUILTIN_MODELS: tuple[str, ...] = tuple(_BUILDERS) + tuple(_SHIPPED)


def _digits():
    from compactfusion_xdit.models import digits

    return digits


def _check_name(name: str) -> None:
    if name not in _BUILDERS and name not in _SHIPPED:
        raise ValueError(f"unknown built-in model {name!r}; built-in models: {', '.join(BUILTIN_MODELS)}")


def build_pipeline(name: str, dtype: torch.dtype = torch.float32):
    """A fresh diffusers pipeline of the built-in model `name`; the same weights on every call.

    Weights are drawn from seed `WEIGHT_SEED` in float32 (the global RNG is left untouched),
    then cast to `dtype`.
    """
    _check_name(name)
    if name in _SHIPPED:
        return _digits().load_pipeline(dtype, path=_SHIPPED[name]())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(WEIGHT_SEED)
        pipe = _BUILDERS[name]()
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


def default_cache_dir() -> str:
    """``$CFX_CACHE`` if set, else ``~/.cache/compactfusion_xdit``."""
    return envs.get(envs.CACHE) or os.path.join(os.path.expanduser("~"), ".cache", "compactfusion_xdit")


def cached_path(name: str, cache_dir: str | None = None) -> str:
    """Where `materialize` puts (or finds) `name`; it may not exist yet."""
    _check_name(name)
    if name in _SHIPPED:
        return _SHIPPED[name]()
    return os.path.join(cache_dir or default_cache_dir(), f"{name}-v{MODEL_VERSION}")


def is_materialized(name: str, cache_dir: str | None = None) -> bool:
    return os.path.isfile(os.path.join(cached_path(name, cache_dir), "model_index.json"))


def materialize(name: str, cache_dir: str | None = None) -> str:
    """Save the built-in model `name` as a diffusers folder once; return its path.

    The folder is ``<cache_dir>/<name>-v<MODEL_VERSION>``. It is written under a temporary name
    and renamed into place, so concurrent callers (ranks, test workers) never see a partial
    folder; when two build at once, the first rename wins and the other copy is discarded.
    """
    path = cached_path(name, cache_dir)
    if is_materialized(name, cache_dir):
        return path
    if name in _SHIPPED:  # nothing to build: the trained weights come with the package
        raise FileNotFoundError(f"the built-in model {name} is missing from {path}; reinstall compactfusion-xdit")
    return save_once(path, lambda: build_pipeline(name))


def save_once(path: str, build) -> str:
    """Save the pipeline `build()` returns as a diffusers folder at `path`, written under a temporary
    name and renamed into place (the first of concurrent writers wins); return `path`."""
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
        build().save_pretrained(tmp)
        try:
            os.rename(tmp, path)
        except OSError:
            if not os.path.isfile(os.path.join(path, "model_index.json")):
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return path


class Family:
    """The built-ins of one module, each `builders[name]()` a fresh pipeline: built seeded (global
    RNG untouched), cached once per `version` as ``<name>-v<version>`` under the cache folder.

        _FAMILY = tiny.Family({"tiny-x": _x}, MODEL_VERSION)
        build_pipeline, cached_path, materialize = _FAMILY.build_pipeline, _FAMILY.cached_path, _FAMILY.materialize
    """

    def __init__(self, builders: dict[str, Callable], version: int) -> None:
        self.builders, self.version = dict(builders), version
        self.names: tuple[str, ...] = tuple(builders)

    def build_pipeline(self, name: str, dtype: torch.dtype = torch.float32):
        """A fresh pipeline of `name` (same weights every call: seeded, global RNG untouched)."""
        if name not in self.builders:
            raise ValueError(f"unknown tiny model {name!r}; known: {', '.join(self.names)}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(WEIGHT_SEED)
            pipe = self.builders[name]()
        return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)

    def cached_path(self, name: str, cache_dir: str | None = None) -> str:
        return os.path.join(cache_dir or default_cache_dir(), f"{name}-v{self.version}")

    def materialize(self, name: str, cache_dir: str | None = None) -> str:
        """Save `name` once as a diffusers folder (written aside, renamed into place); return its path."""
        path = self.cached_path(name, cache_dir)
        if os.path.isfile(os.path.join(path, "model_index.json")):
            return path
        return save_once(path, lambda: self.build_pipeline(name))
