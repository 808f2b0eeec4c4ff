"""What ``--model`` names: a built-in model or a local diffusers folder, and what a rank can load.

    path = registry.resolve("tiny-flux")          # a built-in: built once into the cache, its folder
    path = registry.resolve("/models/flux")       # a local folder: checked, returned
    registry.pipeline_class_name(path)            # "FluxPipeline"; ModelError if no rank can load it

The one model resolution of the launchers (``xfuser``, ``cfx-xdit``) and the ranks. Models are never
downloaded. Importing this module is light (no torch); building a built-in imports it.
"""

from __future__ import annotations

import json
import os

#: diffusers pipeline class (``model_index.json`` ``_class_name``) -> the xfuser wrapper that runs it.
PIPELINES = {
    "FluxPipeline": "xFuserFluxPipeline",
    "PixArtAlphaPipeline": "xFuserPixArtAlphaPipeline",
    "PixArtSigmaPipeline": "xFuserPixArtSigmaPipeline",
    "StableDiffusion3Pipeline": "xFuserStableDiffusion3Pipeline",
    "CogVideoXPipeline": "xFuserCogVideoXPipeline",
    "StableDiffusionXLPipeline": "xFuserStableDiffusionXLPipeline",
}

#: Pipelines with no xfuser wrapper class, loaded by xfuser's runner model of their class
#: (`compactfusion_xdit.patches.runner_models`); their output is a video (``out.frames``).
RUNNER_MODEL_PIPELINES = ("WanPipeline", "HunyuanVideoPipeline")

#: UNet pipelines xfuser 0.7.0 cannot parallelise: the ``xfuser`` command loads them as plain diffusers
#: pipelines (`compactfusion_xdit.patches.unet_pipelines`); step parallelism is their only parallel mode.
UNET_PIPELINES = ("StableVideoDiffusionPipeline", "AudioLDM2Pipeline")

#: What a pipeline's output is, where it is not images: ``frames`` (video) or ``audios`` (waveforms).
VIDEO_PIPELINES = (*RUNNER_MODEL_PIPELINES, "CogVideoXPipeline", "StableVideoDiffusionPipeline")
AUDIO_PIPELINES = ("AudioLDM2Pipeline",)

#: Built-in models built from config by `models.tiny` (random weights, for tests and demos) or
#: shipped trained (``digits-flux``), and the folder-loading stand-ins of `models.tiny_more`.
TINY = ("tiny-flux", "tiny-pixart", "tiny-sd3", "digits-flux")
TINY_MORE = ("tiny-pixart-sigma", "tiny-wan", "tiny-hunyuan-video")
#: The seed papers' video and audio models (`models.tiny_seeds`).
TINY_SEEDS = ("tiny-svd", "tiny-cogvideox", "tiny-audioldm2")
#: Built-in UNet models of `models.tiny_unet`.
TINY_UNET = ("tiny-sdxl",)
BUILTIN_MODELS = TINY + TINY_MORE + TINY_SEEDS + TINY_UNET

#: What each built-in runs at unless the command line gives ``--height``, ``--width``,
#: ``--num_inference_steps`` (``--num_frames``): xfuser's own defaults (1024x1024, 20 steps) are
#: sized for real models. digits-flux was trained on 16x16 images and sampled with 20 steps and
#: 16 text tokens (docs/digits_flux.md; its text tokens are all alike, so 512 would only cost time). The random tiny models draw noise at any size: 64x64 (Flux: 32x32
#: latents, 256 image tokens; PixArt/SD3: 8x8 latents) is the smallest size that still splits
#: over Ulysses, ring, PipeFusion and patch degrees up to 4, and 8 steps cover the compression
#: warm-up plus several coded steps, in about a second on a CPU. The video stand-ins use 32x32
#: and 5 frames, as their loading tests do.
NATIVE_SETTINGS = {
    "digits-flux": {"height": 16, "width": 16, "num_inference_steps": 20, "max_sequence_length": 16},
    **{name: {"height": 64, "width": 64, "num_inference_steps": 8}
       for name in ("tiny-flux", "tiny-pixart", "tiny-sd3", "tiny-pixart-sigma")},
    **{name: {"height": 32, "width": 32, "num_inference_steps": 8, "num_frames": 5}
       for name in ("tiny-wan", "tiny-hunyuan-video")},
    # CogVideoX: 9 frames -> 3 latent frames of 4x4 (2x2 tokens each); SVD: 4 frames of 16x16 latents;
    # AudioLDM2: its UNet's sample size (0.032 s, 512 samples at 16 kHz)
    "tiny-cogvideox": {"height": 32, "width": 32, "num_inference_steps": 8, "num_frames": 9, "max_sequence_length": 16},
    "tiny-svd": {"height": 32, "width": 32, "num_inference_steps": 8, "num_frames": 4},
    "tiny-audioldm2": {"num_inference_steps": 8},
    "tiny-sdxl": {"height": 64, "width": 64, "num_inference_steps": 8},  # 32x32 latents: 2 or 4 bands
}


class ModelError(ValueError):
    """``--model`` names nothing this plugin can load; the message says what to pass instead."""


def _module(name: str):
    if name in TINY_SEEDS:
        from compactfusion_xdit.models import tiny_seeds

        return tiny_seeds
    if name in TINY_UNET:
        from compactfusion_xdit.models import tiny_unet

        return tiny_unet
    if name in TINY_MORE:
        from compactfusion_xdit.models import tiny_more

        return tiny_more
    from compactfusion_xdit.models import tiny

    return tiny


def cached_path(name: str) -> str:
    """Where the built-in `name` lives once built (it may not exist yet)."""
    return _module(name).cached_path(name)


def is_built(name: str) -> bool:
    return os.path.isfile(os.path.join(cached_path(name), "model_index.json"))


def build_pipeline(name: str, dtype=None):
    """A fresh diffusers pipeline of the built-in `name` (the same weights on every call)."""
    module = _module(name)
    return module.build_pipeline(name) if dtype is None else module.build_pipeline(name, dtype)


def resolve(model: str | None, announce=None) -> str:
    """The diffusers folder of `model`: a built-in is built into the cache once (`announce`, if
    given, is called with a line saying so first); a local folder must hold ``model_index.json``."""
    builtins = ", ".join(BUILTIN_MODELS)
    if model is None:
        raise ModelError(f"no --model given; pass a built-in ({builtins}) or a local diffusers folder")
    if model in BUILTIN_MODELS:
        if announce is not None and not is_built(model):
            announce(f"building the built-in model {model} into {cached_path(model)} (once)")
        return _module(model).materialize(model)
    if not os.path.isdir(model):
        raise ModelError(f"--model {model!r} is neither a built-in model ({builtins}) nor a local folder; "
                         "models are not downloaded, pass a diffusers folder (save_pretrained output)")
    if not os.path.isfile(os.path.join(model, "model_index.json")):
        raise ModelError(f"--model {model!r} has no model_index.json; pass a diffusers folder (save_pretrained output)")
    return model


def pipeline_class_name(path: str) -> str:
    """The pipeline class of the folder at `path`; ModelError unless the ranks can load it."""
    with open(os.path.join(path, "model_index.json")) as f:
        name = json.load(f).get("_class_name")
    if name not in PIPELINES and name not in RUNNER_MODEL_PIPELINES and name not in UNET_PIPELINES:
        supported = ", ".join([*PIPELINES, *RUNNER_MODEL_PIPELINES, *UNET_PIPELINES])
        raise ModelError(f"model {path!r} is a {name}; supported pipelines: {supported}")
    return name


def backbone_config(path: str) -> dict:
    """The backbone's ``config.json`` (``transformer/``, else ``unet/``), or {} when the folder has none."""
    for folder in ("transformer", "unet"):
        config = os.path.join(path, folder, "config.json")
        if os.path.isfile(config):
            with open(config) as f:
                return json.load(f)
    return {}


def unet_height_multiple(path: str) -> int | None:
    """For a UNet pipeline folder (``unet/`` and ``vae/`` configs): the image rows per latent-row
    down-sampling unit, ``2 ** (UNet down-samplings) * VAE scale``; None for other folders. Patch
    parallelism over N bands needs the image height to divide by N times this."""
    configs = []
    for part in ("unet", "vae"):
        config = os.path.join(path, part, "config.json")
        if not os.path.isfile(config):
            return None
        with open(config) as f:
            configs.append(json.load(f))
    unet, vae = configs
    downsamplings = len(unet.get("down_block_types", ())) - 1  # every down block but the last halves
    return 2 ** max(downsamplings, 0) * 2 ** (len(vae.get("block_out_channels", (1,))) - 1)


#: What the launchers' checks read of each built-in, known without building it (no torch import):
#: its pipeline class and its backbone's ``transformer/config.json`` entries that the checks use.
#: tests/cli/test_fast_launcher.py compares this table with the built models.
BUILTIN_CONFIGS: dict[str, tuple[str, dict]] = {
    "tiny-flux": ("FluxPipeline", {"num_attention_heads": 4}),
    "tiny-pixart": ("PixArtAlphaPipeline", {"num_attention_heads": 4}),
    "tiny-sd3": ("StableDiffusion3Pipeline", {"num_attention_heads": 4}),
    "digits-flux": ("FluxPipeline", {"num_attention_heads": 4}),
    "tiny-pixart-sigma": ("PixArtSigmaPipeline", {"num_attention_heads": 4}),
    "tiny-wan": ("WanPipeline", {"num_attention_heads": 4}),
    "tiny-hunyuan-video": ("HunyuanVideoPipeline", {"num_attention_heads": 4}),
    "tiny-cogvideox": ("CogVideoXPipeline", {"num_attention_heads": 4}),
    "tiny-svd": ("StableVideoDiffusionPipeline", {}),
    "tiny-audioldm2": ("AudioLDM2Pipeline", {}),
    "tiny-sdxl": ("StableDiffusionXLPipeline", {}),  # a UNet: no transformer/config.json
}


def model_config(model: str | None) -> tuple[str, dict]:
    """The pipeline class and backbone config of `model` without building a built-in: the table
    above for a built-in, the folder's JSON files for a local folder. ModelError as `resolve` and
    `pipeline_class_name` raise it. Cheap: the launchers' usage checks read this before any build."""
    if model in BUILTIN_CONFIGS:
        class_name, config = BUILTIN_CONFIGS[model]
        return class_name, dict(config)
    path = resolve(model)  # a local folder (checked, nothing built); a built-in missing from the table is built
    return pipeline_class_name(path), backbone_config(path)
