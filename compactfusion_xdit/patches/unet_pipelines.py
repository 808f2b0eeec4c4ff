"""UNet pipelines (Stable Video Diffusion, AudioLDM2) under the ``xfuser`` command: plain diffusers pipelines.

xfuser 0.7.0 has no wrapper for them (its ``UnetRuntimeState`` accepts only 2-rank CFG parallel on
SDXL), so nothing of xfuser runs inside their loop; step parallelism (`modes.step_parallel`, over
xfuser's data-parallel group) is their parallel mode. xfuser still builds the process groups:

    pipe = unet_pipelines.load(path, engine_config, torch.float32)     # groups built, pipeline loaded
    kwargs = unet_pipelines.call_arguments(pipe, kwargs, image_path)  # the pipeline's own arguments

`load` sets xfuser's runtime state (``xfuser.core.distributed.runtime_state._RUNTIME``, what
``initialize_runtime_state`` sets for a wrapped pipeline) to a plain ``RuntimeState``, whose
constructor builds the model-parallel groups of the engine config; ``get_runtime_state()`` then
answers the worker as it does for a wrapped pipeline.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch


def initialize_runtime(engine_config: Any) -> None:
    """xfuser's runtime state for a pipeline it does not wrap: groups built from `engine_config`."""
    from xfuser.core.distributed import runtime_state

    class PlainRuntimeState(runtime_state.RuntimeState):
        """The base state (groups, attention backend) without a backbone's patch metadata."""

    runtime_state._RUNTIME = PlainRuntimeState(engine_config)


def load(path: str, engine_config: Any, dtype: torch.dtype) -> Any:
    """The diffusers pipeline of the folder `path`, after xfuser's groups are built."""
    from diffusers import DiffusionPipeline

    initialize_runtime(engine_config)
    return DiffusionPipeline.from_pretrained(path, torch_dtype=dtype)


def sample_rate(pipe: Any) -> int | None:
    """The waveform sample rate of an audio pipeline (its vocoder's), else None."""
    vocoder = getattr(pipe, "vocoder", None)
    return None if vocoder is None else int(vocoder.config.sampling_rate)


def call_arguments(pipe: Any, kwargs: dict, image_path: str | None = None) -> dict:
    """`kwargs` (the run's settings) completed for the pipeline's own signature, and cut to it.

    Image-to-video (SVD): the conditioning ``image`` is read from `image_path`, else a fixed gradient
    (`models.tiny_seeds.default_image`); every frame is decoded in one chunk. Audio (AudioLDM2): the
    ``pil`` output type is a waveform array (``np``); a list of prompts gets a list of negative prompts."""
    kwargs = dict(kwargs)
    name = type(pipe).__name__
    if name == "StableVideoDiffusionPipeline":
        from compactfusion_xdit.models import tiny_seeds

        if image_path:
            from PIL import Image

            image = Image.open(image_path).convert("RGB")
        else:
            image = tiny_seeds.default_image(kwargs.get("height") or 32, kwargs.get("width") or 32)
        kwargs.setdefault("image", image)
        if kwargs.get("num_frames"):
            kwargs.setdefault("decode_chunk_size", kwargs["num_frames"])
    elif name == "AudioLDM2Pipeline":
        if kwargs.get("output_type") == "pil":
            kwargs["output_type"] = "np"
        prompt, negative = kwargs.get("prompt"), kwargs.get("negative_prompt")
        if isinstance(prompt, list) and isinstance(negative, str):  # it wants both of one type
            kwargs["negative_prompt"] = [negative] * len(prompt)
    accepted = inspect.signature(type(pipe).__call__).parameters  # a request's prompt means nothing to SVD
    return {k: v for k, v in kwargs.items() if k in accepted}
