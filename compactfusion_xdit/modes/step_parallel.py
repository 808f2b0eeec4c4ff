"""ParaStep step parallelism (reuse-then-predict) for any ``transformer|unet(...) -> scheduler.step(...)`` loop.

The first `warmup` steps run on every rank. Then steps go in windows of `degree` (the last window
may be shorter). In round r of a window (step ``window_start + r``):

* group rank r evaluates the transformer on its own latent (fresh noise prediction);
* every other rank skips the transformer and advances its latent with its last noise prediction
  (reuse) — except group rank 0, which advances with the prediction rank r sent it (predict);
* at the window's last round, rank 0 broadcasts its latent; every rank continues from it.

Rank r's latent at round r was advanced with reused predictions only, so it starts evaluating at
once: the `degree` evaluations of a window run concurrently. Rank 0 holds the ParaStep trajectory;
after the final window every rank holds the same latent.

Nothing of the pipeline's loop is copied. `StepParallel.install(pipe)` wraps three callables of
the pipeline's objects, on the instances only:

* ``pipe.transformer.forward`` (``pipe.unet.forward`` in a pipeline without a transformer: Stable
  Video Diffusion, AudioLDM2) — skipped on passive rounds, which return the output this rank's
  last evaluation returned at the same call index within a step (so a pipeline that mixes CFG
  branches after the call still gets a well-formed tensor; the scheduler wrapper then substitutes
  the reused/predicted noise). Wrapping ``forward`` rather than ``__call__`` keeps the call visible
  to hooks around ``__call__`` (xfuser's step lifecycle), and keeps every collective of xfuser's
  parallel forward inside what is skipped.
* ``pipe.scheduler.step`` — decides the noise prediction it is given, sends/receives it, and
  broadcasts the latent at window end. The step index is the number of ``step`` calls in the request.
* ``pipe.scheduler.set_timesteps`` — a new request (every ``pipe(...)`` call sets the timesteps
  once): all state is dropped. The request's step count, ``len(scheduler.timesteps)`` minus the
  scheduler's begin index, is read again at its first ``step``.

The noise prediction exchanged is the one the scheduler receives, i.e. after classifier-free
guidance has combined the branches: batch-2 CFG in one rank works unchanged, and so does xfuser's
CFG parallel when the step group joins ranks with the same CFG rank (each CFG pair skips together).

Compression (a `CompressionSession` given): predictions travel as residual payloads over
``session.comm(group)`` with key ``("step", origin_group_rank)``; stats path ``step``. A link
carries one message per window, so for this path a compression warm-up "step" is a window: the
first ``config.warmup`` windows send raw tensors and seed the caches. The latent broadcast is
residual-coded too (one payload for every receiver, link ``("step", "latents", rank0, "all")``):
rank 0 keeps its exact latents, the others continue from the reconstruction, which only feeds
their next predictions, already made on approximate (reused) latents. The broadcast of the final
window is raw, so every rank's output is bitwise equal to rank 0's. Rank 0 counts the broadcast
as ``degree - 1`` messages of ``step`` traffic. With ``--compression auto`` the ranks agree between
requests (`ResidualState.auto_between_requests`): a request sends its predictions and broadcasts raw
while they are timed, and the decision is agreed at the next ``session.begin_request`` (the request
loop's; a caller driving the mode alone calls it before each request).

    mode = StepParallel(degree=2, warmup=2, group=None, session=patches.session())
    mode.install(pipe)            # pipe: a diffusers pipeline or an xfuser pipeline wrapper
    image = pipe(prompt, num_inference_steps=8).images
    mode.uninstall()
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import torch
import torch.distributed as dist

from compactfusion_xdit.comm import p2p
from compactfusion_xdit.comm.pending import Pending

#: Point-to-point tag of the prediction messages (distinct from other paths' tags on a shared group).
STEP_TAG = 0x5E9
PATH = "step"
_ABSENT = object()


@dataclasses.dataclass(frozen=True)
class Round:
    """Where a step lies: window index, its first step, this step's round and the window length."""

    window: int
    start: int
    round: int
    length: int

    @property
    def last(self) -> bool:
        return self.round == self.length - 1


def locate(step: int, warmup: int, degree: int, total: int) -> Round | None:
    """The round of `step` (0-based) in a request of `total` steps; None for a warm-up step."""
    if step < warmup:
        return None
    window, round_ = divmod(step - warmup, degree)
    start = warmup + window * degree
    return Round(window, start, round_, min(degree, total - start))


def check_settings(degree: int, warmup: int) -> None:
    """Raise ValueError (a one-line message naming the fix) for settings ParaStep cannot run."""
    if isinstance(degree, bool) or not isinstance(degree, int) or degree < 1:
        raise ValueError(f"--step_parallel_degree must be an integer >= 1, got {degree!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"--step_parallel_warmup must be an integer >= 0, got {warmup!r}")
    if degree > 1 and warmup < 1:
        raise ValueError("--step_parallel_warmup must be at least 1 with --step_parallel_degree > 1 "
                         "(the first window reuses the last warm-up step's noise prediction)")


def _steps_left(scheduler: Any) -> int:
    """The scheduler steps a request runs: its timesteps from the begin index on."""
    return len(scheduler.timesteps) - (getattr(scheduler, "begin_index", None) or 0)


def _prev_sample(out: Any) -> torch.Tensor:
    if isinstance(out, tuple):
        return out[0]
    sample = getattr(out, "prev_sample", None)
    if not isinstance(sample, torch.Tensor):
        raise TypeError(f"scheduler.step returned {type(out).__name__} without a prev_sample tensor; "
                        "step parallelism needs a diffusers scheduler")
    return sample


def backbone(pipe: Any) -> Any:
    """The denoiser the loop calls once (or once per CFG branch) per step: ``pipe.transformer``, or
    ``pipe.unet`` where the pipeline has no transformer; None when it has neither."""
    transformer = getattr(pipe, "transformer", None)
    return transformer if transformer is not None else getattr(pipe, "unet", None)


class StepParallel:
    """ParaStep over `group` (None: the world; its size must be `degree`). See the module docstring.

    `counts` (per request, reset with it): ``evaluated`` transformer calls run, ``skipped`` calls
    answered from the last output, ``reused`` / ``predicted`` scheduler steps given an old / a
    received prediction, ``windows`` broadcasts done.
    """

    def __init__(self, degree: int, warmup: int, group: dist.ProcessGroup | None = None, session: Any = None,
                 tag: int = STEP_TAG) -> None:
        check_settings(degree, warmup)
        self.degree, self.warmup, self.group, self.session, self.tag = degree, warmup, group, session, tag
        size = dist.get_world_size(group) if dist.is_initialized() else 1
        if size != degree:
            raise ValueError(f"step parallel degree {degree} needs a process group of {degree} ranks, got {size}")
        self.rank = dist.get_rank(group) if dist.is_initialized() else 0
        self.ranks = dist.get_process_group_ranks(group if group is not None else dist.group.WORLD) \
            if dist.is_initialized() else [0]
        self._installed: list[tuple[Any, str, Any]] = []
        if session is not None and degree > 1:  # ranks are not in lock-step within a window
            session.state.auto_between_requests()
        self.begin_request(0)

    # ----- request state --------------------------------------------------------------------------
    def begin_request(self, total_steps: int) -> None:
        """Drop everything of the previous request; the new one has `total_steps` scheduler steps."""
        self.total = total_steps
        self.step = 0  # scheduler.step calls so far in this request
        self.calls_in_step = 0  # transformer calls since the last scheduler.step
        self.last_outputs: dict[int, Any] = {}  # transformer outputs of this rank's last evaluation
        self.last_prediction: torch.Tensor | None = None
        self.incoming: dict[int, Any] = {}  # rank 0: round -> pending receive
        self.outgoing: Any = None  # rank r: the send of this window's prediction
        self.counts = dict(evaluated=0, skipped=0, reused=0, predicted=0, windows=0)

    def position(self, step: int | None = None) -> Round | None:
        return locate(self.step if step is None else step, self.warmup, self.degree, self.total)

    def evaluates(self, step: int | None = None) -> bool:
        """Whether this rank runs the transformer at `step` (default: the current step)."""
        where = self.position(step)
        return where is None or where.round == self.rank

    # ----- installation ---------------------------------------------------------------------------
    def install(self, pipe: Any) -> None:
        """Wrap the backbone's ``forward`` (`backbone`), ``pipe.scheduler.step`` and ``pipe.scheduler.set_timesteps``."""
        if self._installed:
            raise RuntimeError("StepParallel is already installed; call uninstall() first")
        transformer = backbone(pipe)
        scheduler = getattr(pipe, "scheduler", None)
        if transformer is None or not callable(getattr(transformer, "forward", None)):
            raise ValueError(f"{type(pipe).__name__} has no transformer or unet with a forward(); step parallelism "
                             "needs a pipeline whose loop is transformer(...) or unet(...) -> scheduler.step(...)")
        if scheduler is None or not callable(getattr(scheduler, "step", None)) \
                or not callable(getattr(scheduler, "set_timesteps", None)):
            raise ValueError(f"{type(pipe).__name__} has no scheduler with step() and set_timesteps(); "
                             "step parallelism needs a diffusers scheduler")
        self._set(transformer, "forward", self._forward_wrapper(transformer.forward))
        self._set(scheduler, "step", self._step_wrapper(scheduler, scheduler.step))
        self._set(scheduler, "set_timesteps", self._set_timesteps_wrapper(scheduler, scheduler.set_timesteps))

    def uninstall(self) -> None:
        """Remove the wrappers: what the instances held before (their class's method, or an instance
        attribute such as a compiled ``forward``) shows through again."""
        for owner, name, previous in reversed(self._installed):
            if previous is _ABSENT:
                owner.__dict__.pop(name, None)
            else:
                object.__setattr__(owner, name, previous)
        self._installed.clear()

    def _set(self, owner: Any, name: str, value: Any) -> None:
        previous = owner.__dict__.get(name, _ABSENT)
        # object.__setattr__: xfuser's scheduler wrapper forwards attribute writes to the inner scheduler.
        object.__setattr__(owner, name, value)
        self._installed.append((owner, name, previous))

    # ----- wrappers -------------------------------------------------------------------------------
    def _set_timesteps_wrapper(self, scheduler: Any, original: Any):
        @functools.wraps(original)  # pipelines inspect its signature (retrieve_timesteps: sigmas=, mu=)
        def set_timesteps(*args, **kwargs):
            result = original(*args, **kwargs)
            self.begin_request(_steps_left(scheduler))
            return result

        return set_timesteps

    def _forward_wrapper(self, original: Any):
        @functools.wraps(original)
        def forward(*args, **kwargs):
            index = self.calls_in_step
            self.calls_in_step += 1
            if self.evaluates():
                out = original(*args, **kwargs)
                self.last_outputs[index] = out
                self.counts["evaluated"] += 1
                return out
            if index not in self.last_outputs:
                raise RuntimeError(f"step parallelism: transformer call {index} of step {self.step} has no earlier "
                                   "output to stand in for it (the pipeline calls the transformer a varying number "
                                   "of times per step)")
            self.counts["skipped"] += 1
            return self.last_outputs[index]

        return forward

    def _step_wrapper(self, scheduler: Any, original: Any):
        @functools.wraps(original)
        def step(*args, **kwargs):
            args = list(args)
            in_args = bool(args)
            prediction = args[0] if in_args else kwargs["model_output"]
            if self.step == 0:  # img2img pipelines set the begin index after the timesteps
                self.total = _steps_left(scheduler)
            if self.step >= self.total:
                raise RuntimeError(f"step parallelism: scheduler.step call {self.step + 1} of a request with "
                                   f"{self.total} timesteps (set_timesteps must start each request)")
            where = self.position()
            if where is not None:
                prediction = self._prediction_for(where, prediction)
                if in_args:
                    args[0] = prediction
                else:
                    kwargs["model_output"] = prediction
            else:
                self.last_prediction = prediction
            out = original(*args, **kwargs)
            if where is not None and where.last:
                self._end_window(where, _prev_sample(out))
            self.step += 1
            self.calls_in_step = 0
            return out

        return step

    # ----- the exchange ---------------------------------------------------------------------------
    def _group(self) -> dist.ProcessGroup:
        return self.group if self.group is not None else dist.group.WORLD

    def _comm(self):
        return None if self.session is None else self.session.comm(self.group)

    def _with_window_step(self, window: int, fn):
        """Run `fn` with the session's step set to `window` (the step path's message index)."""
        saved = self.session.step
        self.session.set_step(window)
        try:
            return fn()
        finally:
            self.session.set_step(saved)

    def _prediction_for(self, where: Round, fresh: torch.Tensor) -> torch.Tensor:
        """The noise prediction this rank's scheduler uses at round `where` (and the traffic it starts)."""
        if self.rank == 0 and where.round == 0:
            self._post_receives(where, fresh)
        if where.round == self.rank:
            self.last_prediction = fresh
            if self.rank != 0:
                self._send(where, fresh)
            return fresh
        if self.rank == 0:
            self.counts["predicted"] += 1
            return self.incoming.pop(where.round).wait()
        if self.last_prediction is None:
            raise RuntimeError("step parallelism: no earlier noise prediction to reuse (warm-up must be >= 1)")
        self.counts["reused"] += 1
        return self.last_prediction

    def _post_receives(self, where: Round, like: torch.Tensor) -> None:
        comm = self._comm()
        for r in range(1, where.length):
            src = self.ranks[r]
            if comm is None:
                buf = torch.empty_like(like, memory_format=torch.contiguous_format)
                received = p2p.post(self._group(), recvs=[(buf, src, self.tag)])[1]
                self.incoming[r] = Pending([received], lambda buf=buf: buf)
            else:
                self.incoming[r] = self._with_window_step(where.window, lambda r=r, src=src: comm.irecv(
                    (PATH, r), like.shape, like.dtype, src=src, group=self.group, tag=self.tag, device=like.device))

    def _send(self, where: Round, fresh: torch.Tensor) -> None:
        comm = self._comm()
        dst = self.ranks[0]
        if comm is None:
            self.outgoing = p2p.post(self._group(), sends=[(fresh.contiguous(), dst, self.tag)])[0]
        else:
            self.outgoing = self._with_window_step(where.window, lambda: comm.isend(
                (PATH, self.rank), fresh, dst=dst, group=self.group, tag=self.tag))

    def _end_window(self, where: Round, latents: torch.Tensor) -> None:
        if self.outgoing is not None:
            self.outgoing.wait()
            self.outgoing = None
        if self.degree > 1:
            buf = latents if latents.is_contiguous() else latents.contiguous()
            self._broadcast_latents(where, buf)
            if buf is not latents:
                latents.copy_(buf)
        self.counts["windows"] += 1

    def _broadcast_latents(self, where: Round, x: torch.Tensor) -> None:
        """Rank 0's latents to every rank, in place: residual-coded through the communicator (one
        payload for all receivers, link ``("step", "latents", rank0, "all")``) except in the final
        window, which is raw so that every rank ends with rank 0's latents bitwise."""
        src, comm = self.ranks[0], self._comm()
        if comm is None:
            dist.broadcast(x, src=src, group=self._group())
            return
        final = where.start + where.length >= self.total
        self._with_window_step(where.window, lambda: comm.broadcast((PATH, "latents"), x, src, self.group, raw=final))


def install(pipe: Any, args: Any, group: dist.ProcessGroup | None, session: Any) -> StepParallel:
    """The layout's installer (`compactfusion_xdit.modes.layout`): ParaStep on the built pipeline
    with ``--step_parallel_degree`` / ``--step_parallel_warmup`` over `group`; returns the handle."""
    mode = StepParallel(int(args.step_parallel_degree), int(getattr(args, "step_parallel_warmup", 1)),
                        group=group, session=session)
    mode.install(pipe)
    return mode
