"""Patch parallelism (DistriFusion): each rank owns a contiguous slice of the image tokens.

Rank r of a group of P holds tokens ``[r*N/P, (r+1)*N/P)`` of the N image tokens through the
whole backbone; text (joint) tokens stay replicated on every rank and never travel. Every
self/joint attention layer attends over the K/V of *all* image tokens, so the image part of K and
V is all-gathered over the group (two messages per layer: ``k`` and ``v``); the backbone's output
tokens are all-gathered once per call, so every rank returns the full noise prediction.

* ``sync``: each layer gathers this step's K/V before attending: the same result as one process.
* ``displaced``: the first `warmup` steps of a request are synchronous; from then on each layer
  attends over its own fresh K/V and the other ranks' K/V of the previous step, and launches the
  all-gather of its fresh K/V asynchronously; the handle is waited for only when the same layer
  runs at the next step (nothing is launched at the last step of a request).

With a `CompressionSession` the K/V travel as residual payloads over ``session.comm(group)``:
channel keys ``("patch", layer, "k"|"v")`` (the communicator adds the origin rank), stats path
``patch``; displaced mode uses the communicator's asynchronous all-gather. The output gather stays
raw and is counted as raw ``patch`` traffic. The session's step is set to this mode's step.

`PatchParallel` is the model-independent part (slicing, the exchange, steps); the hooks that put it
into diffusers/xfuser models live in `compactfusion_xdit.patches.patch_mode_hooks`:

    mode = PatchParallel(degree=2, mode="displaced", warmup=1, group=None, session=None)
    handle = install_on(pipe, mode)          # any diffusers or xfuser Flux / SD3 / PixArt pipeline
    images = pipe(prompt, num_inference_steps=8).images
    handle.uninstall()
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from compactfusion_xdit.comm.pending import Pending

PATH = "patch"
MODES = ("sync", "displaced")


class PatchParallel:
    """State of one process's patch-parallel mode over `group` (None: the world; size = `degree`).

    Lifecycle (driven by the hooks): `begin_request(total_steps)` when the scheduler's timesteps
    are set; `begin_call(timestep)` before each backbone call (a new timestep starts the next step);
    `next_layer()` when an attention layer starts; `end_call()` after the backbone call.
    """

    def __init__(self, degree: int, mode: str = "displaced", warmup: int = 1, group: Any = None,
                 session: Any = None) -> None:
        if mode not in MODES:
            raise ValueError(f"patch parallel mode {mode!r} is unknown; use {' or '.join(MODES)}")
        if mode == "displaced" and warmup < 1:
            raise ValueError("displaced patch parallelism needs at least one synchronous warm-up step (--warmup_steps)")
        size = dist.get_world_size(group) if dist.is_initialized() else 1
        if size != degree:
            raise ValueError(f"patch parallel degree {degree} needs a process group of {degree} ranks, got {size}")
        self.degree, self.mode, self.warmup, self.group, self.session = degree, mode, warmup, group, session
        self.rank = dist.get_rank(group) if dist.is_initialized() else 0
        self._requests_seen = -1
        self._pending: dict[tuple, Pending] = {}
        self.begin_request(0)

    # ----- lifecycle ------------------------------------------------------------------------------
    def begin_request(self, total_steps: int) -> None:
        """A new request of `total_steps` steps (0: unknown): in-flight gathers completed, state dropped."""
        for pending in self._pending.values():
            pending.wait()
        self.total = total_steps
        self.step = -1
        self.layer = -1
        self._last_timestep: torch.Tensor | None = None
        self._pending: dict[tuple, Pending] = {}  # (layer, "k"|"v") -> all-gather launched last step
        self._stale: dict[tuple, torch.Tensor] = {}  # (layer, "k"|"v") -> (P, ...) K/V of the last step
        self.image_tokens = 0  # N of the current call
        self.kv_shapes: list[tuple[int, ...]] = []  # per layer of the step: shape of one K (or V) message
        self.output_nbytes = 0  # bytes of this rank's output tokens (one raw message per peer and call)
        self.counts = dict(sync_layers=0, displaced_layers=0)
        session = self.session
        if session is not None and session.requests == self._requests_seen:
            session.begin_request()  # nothing else started this request (e.g. xfuser's naive path)
        self._requests_seen = session.requests if session is not None else -1

    def begin_call(self, timestep: Any) -> None:
        t = timestep.detach().clone() if isinstance(timestep, torch.Tensor) else None
        last = self._last_timestep
        same = t is not None and last is not None and t.shape == last.shape and torch.equal(t, last)
        if self.step < 0 or not same:
            self.step += 1
            self.layer = -1
        self._last_timestep = t
        if self.session is not None:
            self.session.set_step(self.step)

    def end_call(self) -> None:
        if self.session is not None and getattr(self.session.config, "check", False):
            # --compression-check compares caches at step boundaries: settle the in-flight messages.
            for pending in self._pending.values():
                pending.wait()

    def next_layer(self) -> int:
        """Index of the attention layer starting now, counted over the step (all backbone calls)."""
        self.layer += 1
        return self.layer

    @property
    def displaced_now(self) -> bool:
        return self.mode == "displaced" and self.step >= self.warmup

    # ----- token slices ---------------------------------------------------------------------------
    def local_range(self, n: int) -> tuple[int, int]:
        if n % self.degree:
            raise ValueError(f"patch parallelism over {self.degree} ranks needs the image token count to divide "
                             f"evenly, got {n} tokens; choose --height/--width so that it does")
        share = n // self.degree
        return self.rank * share, (self.rank + 1) * share

    def split_tokens(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's slice of the image tokens of `x` (all N along `dim`); records N."""
        self.image_tokens = x.shape[dim]
        lo, hi = self.local_range(self.image_tokens)
        return x.narrow(dim, lo, hi - lo)

    def split_rows(self, x: torch.Tensor, text_rows: int) -> torch.Tensor:
        """Rows of a per-token table laid out ``[text rows, image rows]``: the text rows and this
        rank's image rows (e.g. rotary cos/sin)."""
        lo, hi = self.local_range(x.shape[0] - text_rows)
        return torch.cat([x[:text_rows], x[text_rows + lo:text_rows + hi]], dim=0)

    @property
    def local_tokens(self) -> int:
        return self.image_tokens // self.degree

    def gather_tokens(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Every rank's slice of `x` along `dim`, concatenated in rank order (raw all-gather)."""
        x = x.contiguous()
        self.output_nbytes = x.numel() * x.element_size()
        out = torch.empty((self.degree, *x.shape), dtype=x.dtype, device=x.device)
        dist.all_gather_into_tensor(out, x.unsqueeze(0), group=self._group())
        if self.session is not None:
            from compactfusion_xdit.core.residual import MessageKind

            nbytes = (self.degree - 1) * x.numel() * x.element_size()
            self.session.state.record(PATH, MessageKind.RAW, nbytes, nbytes, self.degree - 1)
        return torch.cat(out.unbind(0), dim=dim)

    # ----- the K/V exchange -----------------------------------------------------------------------
    def exchange(self, layer: int, key: torch.Tensor, value: torch.Tensor, seq_dim: int,
                 text_first: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of attention layer `layer` with the image part widened from this rank's tokens to
        all ranks' tokens. `key`/`value` hold ``text + local image`` tokens along `seq_dim`, text
        before the image when `text_first` (else after)."""
        n_local = self.local_tokens
        n_text = key.shape[seq_dim] - n_local
        if n_local <= 0 or n_text < 0:
            raise RuntimeError(f"patch parallelism: attention layer {layer} has {key.shape[seq_dim]} key tokens, "
                               f"fewer than this rank's {n_local} image tokens")
        out = []
        for name, x in (("k", key), ("v", value)):
            if text_first:
                text, image = x.split([n_text, n_local], dim=seq_dim)
            else:
                image, text = x.split([n_local, n_text], dim=seq_dim)
            full = self._image_all(layer, name, image.contiguous(), seq_dim)
            out.append(torch.cat([text, full] if text_first else [full, text], dim=seq_dim))
        return out[0], out[1]

    def _image_all(self, layer: int, name: str, image: torch.Tensor, seq_dim: int) -> torch.Tensor:
        slot = (layer, name)
        if layer == len(self.kv_shapes):
            self.kv_shapes.append(tuple(image.shape))
        displaced = self.displaced_now
        gathered = self.fresh_or_previous(slot, lambda: self._launch(slot, image), f"K/V for layer {layer}")
        if displaced:
            gathered[self.rank] = image  # own tokens always fresh
        if name == "k":
            self.counts["displaced_layers" if displaced else "sync_layers"] += 1
        return torch.cat(gathered.unbind(0), dim=seq_dim)

    def fresh_or_previous(self, slot: tuple, launch, what: str):
        """The result of the exchange `launch()` starts for `slot`: this step's on a synchronous
        step; on a displaced step the previous step's (its handle waited for now) while this
        step's is launched for the next one (not at a request's last step). The last warm-up
        step's result is kept for the first displaced step. `what` names the exchange in errors."""
        if not self.displaced_now:
            result = launch().wait()
            self._keep(slot, lambda: result)
            return result
        pending = self._pending.pop(slot, None)
        result = pending.wait() if pending is not None else self._stale.pop(slot, None)
        if result is None:
            raise RuntimeError(f"displaced patch parallelism: no {what} of the previous step "
                               "(the model's layers changed between steps)")
        if self.total == 0 or self.step + 1 < self.total:
            self._pending[slot] = launch()
        return result

    def _keep(self, slot: tuple, make) -> None:
        """On the last warm-up step of displaced mode, keep `make()` as `slot`'s result for the first
        displaced step."""
        if self.mode == "displaced" and self.step + 1 == self.warmup:
            self._stale[slot] = make()

    def _launch(self, slot: tuple, image: torch.Tensor) -> Pending:
        """Asynchronous all-gather of `image`; ``wait()`` gives ``(P, *image.shape)``."""
        if self.session is not None:
            return self.session.comm(self.group).all_gather((PATH, *slot), image, group=self.group, async_op=True)
        out = torch.empty((self.degree, *image.shape), dtype=image.dtype, device=image.device)
        work = dist.all_gather_into_tensor(out, image.unsqueeze(0), group=self._group(), async_op=True)
        return Pending([work], lambda: out, keep=image)

    def _group(self):
        return self.group if self.group is not None else dist.group.WORLD

    def attach(self, pipe: Any, cfg_parallel: bool = False):
        """Hook this mode into a DiT pipeline (`patches.patch_mode_hooks.attach`); xfuser's CFG
        parallel splits the guidance batch itself there. Returns the handle to uninstall."""
        from compactfusion_xdit.patches import patch_mode_hooks

        return patch_mode_hooks.attach(pipe, self)


def install_on(pipe: Any, mode: PatchParallel, cfg_parallel: bool = False):
    """Hook `mode` into `pipe` (`mode.attach`: the DiT hooks of
    `compactfusion_xdit.patches.patch_mode_hooks`, or a `UNetPatchParallel`'s own, which split the
    guidance batch themselves when `cfg_parallel`)."""
    return mode.attach(pipe, cfg_parallel)
