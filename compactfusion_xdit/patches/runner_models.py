"""xfuser 0.7.0's model runner (``xfuser.runner``, ``MODEL_REGISTRY``): local folders, PixArt, CPU ranks.

xfuser's runner models load from ``settings.model_name``, a Hub id (``black-forest-labs/FLUX.1-dev``),
and ``xFuserModelRunner`` looks ``--model`` up in ``MODEL_REGISTRY`` by name, so a local folder is
not a model there. `register_local_folder` reads the folder's ``model_index.json``, picks the
registered model of its pipeline class (`RUNNER_MODELS`) and registers a subclass under the
folder's path whose ``settings.model_name`` is that path (and which asks for no Hub revision).

xfuser 0.7.0 registers no PixArt, CogVideoX or SDXL model; `pixart_models` registers PixArt-alpha and
-sigma runner models built on xfuser's own ``xFuserPixArt{Alpha,Sigma}Pipeline`` wrappers,
`cogvideox_models` a CogVideoX one on ``xFuserCogVideoXPipeline`` (Ulysses, ring, CFG parallel) and
`sdxl_model` an SDXL one on ``xFuserStableDiffusionXLPipeline`` (CFG parallel only, as the wrapper).

`apply_cpu` (no CUDA only): the runner's placement moves the pipeline to ``cuda:<rank>`` and its
timing uses CUDA events; on CPU the pipeline stays where it was loaded and the wall clock times it.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import torch

from compactfusion_xdit.patches._attrs import AttributePatcher

#: diffusers pipeline class (``model_index.json`` ``_class_name``) -> xfuser runner registry name.
RUNNER_MODELS = {
    "FluxPipeline": "FLUX.1-dev",
    "StableDiffusion3Pipeline": "SD3.5",
    "WanPipeline": "Wan2.1-T2V",
    "HunyuanVideoPipeline": "HunyuanVideo",
    "PixArtAlphaPipeline": "PixArt-alpha",
    "PixArtSigmaPipeline": "PixArt-sigma",
    "CogVideoXPipeline": "CogVideoX-2b",
    "StableDiffusionXLPipeline": "SDXL",
}


class LocalModelError(ValueError):
    """A ``--model`` folder the runner cannot serve; the message says why and what works."""


def registry() -> dict:
    from xfuser.model_executor.models.runner_models.base_model import MODEL_REGISTRY

    pixart_models()
    cogvideox_models()
    sdxl_model()
    return MODEL_REGISTRY


def folder_pipeline_class(path: str) -> str:
    index = os.path.join(path, "model_index.json")
    if not os.path.isfile(index):
        raise LocalModelError(f"--model {path!r} has no model_index.json; pass a diffusers folder (save_pretrained output)")
    with open(index) as f:
        return json.load(f).get("_class_name", "")


def register_local_folder(path: str, dtype: torch.dtype | None = None) -> str:
    """Register the runner model of the diffusers folder `path` under its absolute path; return that key.

    `dtype` (optional) casts the loaded pipeline (xfuser's runner models pick bf16/fp16 themselves).
    """
    path = os.path.abspath(path)
    class_name = folder_pipeline_class(path)
    if class_name not in RUNNER_MODELS:
        raise LocalModelError(f"--model {path!r} holds a {class_name or 'pipeline of unknown class'}; the runner serves "
                              f"local folders of {', '.join(RUNNER_MODELS)}")
    models = registry()
    base = models[RUNNER_MODELS[class_name]]
    models[path] = _local_subclass(base, path, dtype)
    return path


def _local_subclass(base: type, path: str, dtype: torch.dtype | None) -> type:
    def _customize_settings(self, config):
        base._customize_settings(self, config)
        self.settings.model_name = path

    def _load_model(self):
        pipe = base._load_model(self)
        return pipe if dtype is None else pipe.to(dtype=dtype)

    return type(f"Local{base.__name__}", (base,), {
        "_customize_settings": _customize_settings,
        "_load_model": _load_model,
        "checkpoint_request_defaults": {},  # a Hub revision (HunyuanVideo's PR branch) means nothing locally
        "__doc__": f"{base.__name__} loading from the local folder {path}.",
    })


def pixart_models() -> dict[str, type]:
    """Register (once) and return PixArt-alpha/-sigma runner models, which xfuser 0.7.0 lacks."""
    from xfuser.model_executor.models.runner_models import base_model as bm

    if "PixArt-alpha" in bm.MODEL_REGISTRY:
        return {name: bm.MODEL_REGISTRY[name] for name in ("PixArt-alpha", "PixArt-sigma")}

    class _PixArtModel(bm.xFuserModel):
        wrapper_name = ""
        capabilities = bm.ModelCapabilities(ulysses_degree=True, ring_degree=True, pipefusion_parallel_degree=True,
                                            use_cfg_parallel=True, use_parallel_vae=True)
        default_input_values = bm.DefaultInputValues(height=1024, width=1024, num_inference_steps=20,
                                                     guidance_scale=4.5, max_sequence_length=120)

        def _load_model(self):
            import xfuser

            wrapper = getattr(xfuser, self.wrapper_name)
            return wrapper.from_pretrained(pretrained_model_name_or_path=self.settings.model_name,
                                           engine_config=self.engine_config, torch_dtype=torch.float16)

        def _run_pipe(self, input_args: dict):
            output = self.pipe(height=input_args["height"], width=input_args["width"], prompt=input_args["prompt"],
                               negative_prompt=input_args.get("negative_prompt") or "",
                               num_inference_steps=input_args["num_inference_steps"],
                               guidance_scale=input_args["guidance_scale"],
                               max_sequence_length=input_args["max_sequence_length"],
                               use_resolution_binning=False, output_type="pil",
                               generator=self._make_generator(input_args["seed"]))
            return bm.DiffusionOutput(images=output.images if output else [], pipe_args=input_args)

    class PixArtAlphaModel(_PixArtModel):
        wrapper_name = "xFuserPixArtAlphaPipeline"
        settings = bm.ModelSettings(model_name="PixArt-alpha/PixArt-XL-2-1024-MS", output_name="pixart_alpha",
                                    model_output_type="image")

    class PixArtSigmaModel(_PixArtModel):
        wrapper_name = "xFuserPixArtSigmaPipeline"
        default_input_values = bm.DefaultInputValues(height=1024, width=1024, num_inference_steps=20,
                                                     guidance_scale=4.5, max_sequence_length=300)
        settings = bm.ModelSettings(model_name="PixArt-alpha/PixArt-Sigma-XL-2-1024-MS", output_name="pixart_sigma",
                                    model_output_type="image")

    for name in ("PixArt-alpha/PixArt-XL-2-1024-MS", "PixArt-alpha"):
        bm.register_model(name)(PixArtAlphaModel)
    for name in ("PixArt-alpha/PixArt-Sigma-XL-2-1024-MS", "PixArt-sigma"):
        bm.register_model(name)(PixArtSigmaModel)
    return {"PixArt-alpha": PixArtAlphaModel, "PixArt-sigma": PixArtSigmaModel}


def cogvideox_models() -> dict[str, type]:
    """Register (once) and return a CogVideoX runner model (``xFuserCogVideoXPipeline``), which xfuser 0.7.0 lacks."""
    from xfuser.model_executor.models.runner_models import base_model as bm

    if "CogVideoX-2b" in bm.MODEL_REGISTRY:
        return {"CogVideoX-2b": bm.MODEL_REGISTRY["CogVideoX-2b"]}

    class CogVideoXModel(bm.xFuserModel):
        capabilities = bm.ModelCapabilities(ulysses_degree=True, ring_degree=True, use_cfg_parallel=True)
        default_input_values = bm.DefaultInputValues(height=480, width=720, num_frames=49, num_inference_steps=50,
                                                     guidance_scale=6.0, max_sequence_length=226)
        settings = bm.ModelSettings(model_name="THUDM/CogVideoX-2b", output_name="cogvideox", model_output_type="video",
                                    fps=8)

        def _load_model(self):
            import xfuser

            return xfuser.xFuserCogVideoXPipeline.from_pretrained(
                pretrained_model_name_or_path=self.settings.model_name, engine_config=self.engine_config,
                torch_dtype=torch.float16)

        def _run_pipe(self, input_args: dict):
            output = self.pipe(height=input_args["height"], width=input_args["width"], prompt=input_args["prompt"],
                               num_frames=input_args["num_frames"], num_inference_steps=input_args["num_inference_steps"],
                               guidance_scale=input_args["guidance_scale"],
                               max_sequence_length=input_args["max_sequence_length"],
                               generator=self._make_generator(input_args["seed"]))
            return bm.DiffusionOutput(videos=output.frames if output else [], pipe_args=input_args)

    for name in ("THUDM/CogVideoX-2b", "CogVideoX-2b"):
        bm.register_model(name)(CogVideoXModel)
    return {"CogVideoX-2b": CogVideoXModel}


def sdxl_model() -> type:
    """Register (once) and return an SDXL runner model, which xfuser 0.7.0 lacks."""
    from xfuser.model_executor.models.runner_models import base_model as bm

    if "SDXL" in bm.MODEL_REGISTRY:
        return bm.MODEL_REGISTRY["SDXL"]

    class SDXLModel(bm.xFuserModel):
        capabilities = bm.ModelCapabilities(ulysses_degree=False, ring_degree=False, use_cfg_parallel=True)
        default_input_values = bm.DefaultInputValues(height=1024, width=1024, num_inference_steps=30,
                                                     guidance_scale=5.0)
        settings = bm.ModelSettings(model_name="stabilityai/stable-diffusion-xl-base-1.0", output_name="sdxl",
                                    model_output_type="image")

        def _load_model(self):
            from xfuser import xFuserStableDiffusionXLPipeline

            dtype = torch.float16 if torch.cuda.is_available() else torch.float32
            return xFuserStableDiffusionXLPipeline.from_pretrained(
                pretrained_model_name_or_path=self.settings.model_name, engine_config=self.engine_config,
                torch_dtype=dtype)

        def _run_pipe(self, input_args: dict):
            output = self.pipe(height=input_args["height"], width=input_args["width"], prompt=input_args["prompt"],
                               negative_prompt=input_args.get("negative_prompt") or None,
                               num_inference_steps=input_args["num_inference_steps"],
                               guidance_scale=input_args["guidance_scale"], output_type="pil",
                               generator=self._make_generator(input_args["seed"]))
            return bm.DiffusionOutput(images=output.images if output else [], pipe_args=input_args)

    for name in ("stabilityai/stable-diffusion-xl-base-1.0", "SDXL"):
        bm.register_model(name)(SDXLModel)
    return SDXLModel


def apply_cpu(patcher: AttributePatcher) -> None:
    """Without CUDA: keep the pipeline on the CPU at placement and time requests by wall clock."""
    from compactfusion_xdit.patches import cpu_gloo

    if cpu_gloo.cuda_available():
        return
    from xfuser.model_executor.models.runner_models import base_model
    from xfuser.model_executor.models.runner_models.loading import placement

    patcher.replace(placement, "place_pipeline_components", _place_on_cpu(placement.place_pipeline_components))
    patcher.replace(base_model.xFuserModel, "_run_timed_pipe", _wall_clock_timed_pipe)
    patcher.replace(base_model.xFuserModel, "_local_onload_device", lambda self: torch.device("cpu"))


def _place_on_cpu(original):
    def place_pipeline_components(loader: Any) -> None:
        config = loader.model.config
        if config.use_fp8_gemms or config.use_fp4_gemms or getattr(config, "use_int8_gemms", False):
            raise LocalModelError("quantized GEMMs (--use_fp8_gemms/--use_fp4_gemms/--use_int8_gemms) need a GPU")
        loader.fill_eager_transformers()  # the weights; no device move: the ranks compute on the CPU

    place_pipeline_components.__wrapped__ = original
    return place_pipeline_components


def _wall_clock_timed_pipe(self, input_args: dict):
    from xfuser.core.distributed import get_model_replica_group

    self.prepare_run(input_args)
    get_model_replica_group().barrier()
    start = time.perf_counter()
    out = self._run_pipe(input_args)
    return out, time.perf_counter() - start


def load_with_runner_model(path: str, engine_args: Any, settings: dict, dtype: torch.dtype | None) -> Any:
    """Load the folder `path` the way xfuser's runner model of its pipeline class does (for pipelines
    with no ``xFuser*Pipeline`` wrapper: Wan, HunyuanVideo) and return the ready pipeline.

    `engine_args` is the run's ``xFuserArgs`` (distributed already initialised); `settings` the run's
    flags as a dict (the model's defaults fill what is missing)."""
    import dataclasses

    key = register_local_folder(path, dtype)
    engine_args.model = key
    model = registry()[key](engine_args)
    input_args = {**dataclasses.asdict(engine_args), "dataset_path": None, "input_images": [],
                  "resize_input_images": False, **settings}
    input_args = model.preprocess_args(input_args)
    cpu = AttributePatcher()
    apply_cpu(cpu)
    try:
        model.initialize(input_args)
    finally:
        cpu.restore()
    model.pipe.xfuser_runner_model = model  # keep the model (and its loader) alive with the pipe
    return model.pipe
