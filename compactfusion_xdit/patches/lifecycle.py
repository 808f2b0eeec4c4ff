"""Request and step lifecycle of every xfuser DiT pipeline, hooked in two shared places.

* **Request**: every xfuser DiT pipeline's ``__call__`` (and ``prepare_run``, which calls it) starts by
  calling ``DiTRuntimeState.set_input_parameters`` (``set_video_input_parameters`` for video
  pipelines) before anything is denoised. Both are wrapped: ``session.begin_request()`` drops
  every cache, so a new prompt, resolution or batch never meets a stale cache.
* **Step**: every pipeline runs its parallel backbone through ``xFuserTransformerBaseWrapper``
  (each rank, each PipeFusion stage, each patch). Its ``__call__`` is wrapped; before the outermost
  backbone call runs, the step is decided:

  - the first backbone call of a request is step 0;
  - in PipeFusion's patch mode, a call for patch 1..P-1 continues the current step;
  - a call with the same ``timestep`` tensor as the previous one continues the current step
    (a pipeline that evaluates the model twice at one timestep);
  - any other call starts the next step: ``session.set_step(step + 1)``.

  So ``session.step`` is the index of the denoising step within the request, PipeFusion's
  synchronous warm-up steps (``--warmup_steps``) included, and it is the same on every rank.

Cache checks (``config.check``, ``--compression-check``): when a step ends (the next one starts)
every rank compares its cache digests over the world group (`StepTracker.check_caches`); the
worker adds one more check after the run and reads the outcome from ``session.lifecycle``. That
final check also compares, key by key, the checksum every sender and receiver recorded after each
message (`compactfusion_xdit.core.cache_history`): every step of every path, with no collective during
the request. With PipeFusion (pipeline degree > 1) that history is the per-step check: the stages
are pipelined, so a collective at one stage's step boundary would wait for a stage that is itself
waiting for the first one's next patch (observed: deadlock), and stage-to-stage messages are in
flight there.

``--compression auto`` with PipeFusion (pipeline degree > 1): at each request start the session is
told to agree between requests (`ResidualState.auto_between_requests`), for the same reason.

Nothing here depends on one model file; the loops of Flux, PixArt, SD3 (sync and PipeFusion
async) all pass through these two points.
"""

from __future__ import annotations

from typing import Any

import torch

from compactfusion_xdit.patches._attrs import AttributePatcher


class StepTracker:
    """Per-process lifecycle state: how the current request's backbone calls map to steps."""

    def __init__(self, session: Any) -> None:
        self.session = session
        self.calls = 0  # outermost backbone calls in this request
        self.depth = 0  # nesting of backbone calls (a wrapper calling a wrapper)
        self.last_timestep: torch.Tensor | None = None
        self.checks = 0  # cache checks run (every rank the same number)
        self.mismatches: list[str] = []  # what the checks found (empty: caches consistent)
        self.history = None  # per-message cache history (compactfusion_xdit.core.cache_history) when checking
        if getattr(session.config, "check", False):
            from compactfusion_xdit.core.cache_history import CacheHistory

            self.history = CacheHistory(session.state)

    @property
    def cache_consistent(self) -> bool | None:
        """None before any check, else whether every check found the caches bitwise equal."""
        return None if self.checks == 0 else not self.mismatches

    def reset_checks(self) -> None:
        self.checks = 0
        self.mismatches.clear()

    def check_caches(self) -> list[str]:
        """After a request: compare every cache, and every key's history of cache updates (one entry
        per message: every step, every path), across the world group (collective: every rank)."""
        problems = self._check_now()
        if self.history is not None:
            history = self.history.mismatches(None)
            self.mismatches.extend(f"history: {p}" for p in history)
            problems = problems + history
        return problems

    def _check_now(self) -> list[str]:
        """Compare the caches as they are now across the world group (collective)."""
        problems = self.session.check_caches(None)
        self.checks += 1
        self.mismatches.extend(f"step {self.session.step}: {p}" for p in problems)
        return problems

    def _checks_per_step(self) -> bool:
        if not getattr(self.session.config, "check", False):
            return False
        return not _pipelined()

    def begin_request(self) -> None:
        """Called by `CompressionSession.begin_request`: step counting and cache checks start afresh."""
        self.calls = 0
        self.last_timestep = None
        self.reset_checks()
        if self.history is not None:
            self.history.clear()

    def before_backbone(self, timestep: Any, continuing_patch: bool) -> None:
        """Called before an outermost backbone call; advances the step when a new one starts."""
        t = timestep.detach().clone() if isinstance(timestep, torch.Tensor) else None
        if self.calls == 0:
            self.session.set_step(0)
        elif continuing_patch or self._same_timestep(t):
            pass
        else:
            if self._checks_per_step():
                self._check_now()
            self.session.set_step(self.session.step + 1)
        self.calls += 1
        self.last_timestep = t

    def _same_timestep(self, t: torch.Tensor | None) -> bool:
        last = self.last_timestep
        return (t is not None and last is not None and t.shape == last.shape and t.dtype == last.dtype
                and t.device == last.device and torch.equal(t, last))


def apply(patcher: AttributePatcher, session: Any) -> StepTracker:
    """Hook the request start and the step boundaries of every xfuser DiT pipeline to `session`."""
    from xfuser.core.distributed import runtime_state as rs_module
    from xfuser.model_executor.models.transformers.base_transformer import xFuserTransformerBaseWrapper

    tracker = StepTracker(session)
    session.lifecycle = tracker  # the worker reads the cache-check outcome from here
    runtime_cls = rs_module.DiTRuntimeState

    for name in ("set_input_parameters", "set_video_input_parameters"):
        original = getattr(runtime_cls, name, None)
        if original is not None:
            patcher.replace(runtime_cls, name, _begin_request_wrapper(original, tracker))

    def tracked(module_call):
        def backbone_call(self, *args, **kwargs):
            if tracker.depth == 0:
                state = rs_module.get_runtime_state()
                continuing_patch = bool(getattr(state, "patch_mode", False)) and getattr(state, "pipeline_patch_idx", 0) != 0
                # xfuser's pipelines pass the timestep by keyword; a positional one is not compared.
                tracker.before_backbone(kwargs.get("timestep"), continuing_patch)
            tracker.depth += 1
            try:
                return module_call(self, *args, **kwargs)
            finally:
                tracker.depth -= 1

        return backbone_call

    patcher.replace(xFuserTransformerBaseWrapper, "__call__", tracked(xFuserTransformerBaseWrapper.__call__))
    for backbone in _plain_diffusers_backbones():
        patcher.replace(backbone, "__call__", tracked(backbone.__call__))
    return tracker


def _plain_diffusers_backbones() -> list[type]:
    """xfuser backbones that subclass the diffusers model instead of xFuserTransformerBaseWrapper
    (the runner's Flux, Wan and HunyuanVideo models call them from diffusers' own pipelines)."""
    import importlib

    found = []
    for module, name in (("transformer_flux", "xFuserFlux1Transformer2DWrapper"),
                         ("transformer_wan", "xFuserWanTransformer3DWrapper"),
                         ("transformer_wan_vace", "xFuserWanVACETransformer3DWrapper"),
                         ("transformer_hunyuan_video", "xFuserHunyuanVideoTransformer3DWrapper"),
                         ("transformer_hunyuan_video15", "xFuserHunyuanVideo15Transformer3DWrapper")):
        try:
            found.append(getattr(importlib.import_module(f"xfuser.model_executor.models.transformers.{module}"), name))
        except (ImportError, AttributeError):
            pass
    return found


def _pipelined() -> bool:
    """Whether xfuser runs PipeFusion (pipeline degree > 1; False before its groups exist)."""
    from xfuser.core.distributed import get_pipeline_parallel_world_size, model_parallel_is_initialized

    return model_parallel_is_initialized() and get_pipeline_parallel_world_size() > 1


def _begin_request_wrapper(original, tracker: StepTracker):
    def set_parameters(self, *args, **kwargs):
        if tracker.session.state.auto is not None and _pipelined():  # stages not in lock-step: auto agrees between requests
            tracker.session.state.auto_between_requests()
        tracker.session.begin_request()
        return original(self, *args, **kwargs)

    set_parameters.__wrapped__ = original
    set_parameters.__name__ = getattr(original, "__name__", "set_parameters")
    return set_parameters
