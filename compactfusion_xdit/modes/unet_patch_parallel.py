"""Patch parallelism (DistriFusion) on UNets: each rank owns a band of latent rows.

Rank r of a group of P holds rows ``[r*H/P, (r+1)*H/P)`` of every feature map (at every
resolution of the UNet: down- and up-sampling by 2 keep the bands aligned when H divides by
``P * 2**downsamplings``). Three kinds of layer see beyond the band:

* **Convolutions** (kernel > 1 row): the rows above and below the band (the *halo*: 1 row each for
  a 3x3 convolution, 1 above and none below for a stride-2 3x3) come from the neighbouring ranks
  by point-to-point messages: key ``("patch", conv, "halo-down")`` carries a band's last rows to
  the rank below, ``("patch", conv, "halo-up")`` its first rows to the rank above; past the image
  edge the rows are zeros (the convolution's zero padding). The rows travel channels-last
  ``(B, rows, W, C)`` (pixels x channels, like tokens x channels for the codecs).
* **GroupNorm**: statistics over the whole image. Each rank sends its band's per-(sample, group)
  mean and variance (``(B, G, 2)`` fp32, one raw all-gather, key ``("patch", norm, "stats")``);
  the whole-image mean is the mean of the band means, the variance the mean of
  ``var_r + (mean_r - mean)**2`` (equal band sizes).
* **Self-attention**: K/V of every band, all-gathered as in `PatchParallel` (keys
  ``("patch", layer, "k"|"v")``); cross-attention reads text only and stays local.

``sync`` exchanges fresh halos/statistics/KV in every layer. ``displaced`` runs its first `warmup`
steps on the *whole* latent on every rank (`whole_now`: the stock UNet, bitwise one process's
result, nothing exchanged; each warm-up step costs one undivided step of compute) and keeps, from
the last of them, the other bands' halo rows, statistics and K/V as "the previous step's". A banded
sync step could not give that exactness: its whole-image GroupNorm statistics are combined from
band moments, a different float summation than torch's kernel. Afterwards each layer uses the
other ranks' halo rows, statistics and K/V of the previous step with its own fresh ones
(GroupNorm: the others' stale band statistics combined with the fresh local ones), and launches
this step's exchange asynchronously for the next step.

Compression (a `CompressionSession`): halo rows and K/V travel through ``session.comm(group)`` as
residual payloads on path ``patch``. GroupNorm statistics stay raw (``2*B*G`` floats per layer: the
codecs' per-row scales would cost more than they save) and so does the once-per-call output
gather; both are counted as raw ``patch`` traffic.

The diffusers hooks are in `compactfusion_xdit.patches.unet_patch_hooks`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from compactfusion_xdit.comm.pending import Pending
from compactfusion_xdit.modes.patch_parallel import PATH, PatchParallel


class UNetPatchParallel(PatchParallel):
    """`PatchParallel` over latent rows, plus halo rows and GroupNorm statistics.

    Per step (counted over all UNet calls of the step, like attention layers): `halo` numbers the
    convolutions, `norm_stats` the GroupNorms, in call order."""

    def __init__(self, degree: int, mode: str = "displaced", warmup: int = 1, group: Any = None,
                 session: Any = None) -> None:
        super().__init__(degree, mode, warmup, group, session)
        if session is not None and mode == "displaced":
            # the whole warm-up steps exchange nothing for --compression auto to time: it measures
            # a raw request instead and agrees at the next request's start
            session.state.auto_between_requests()
        glob = (lambda r: dist.get_global_rank(group, r)) if group is not None else (lambda r: r)
        #: global ranks of the bands above and below (None at the image edges)
        self.above = glob(self.rank - 1) if self.rank > 0 else None
        self.below = glob(self.rank + 1) if self.rank + 1 < degree else None

    # ----- lifecycle ------------------------------------------------------------------------------
    def attach(self, pipe: Any, cfg_parallel: bool = False):
        """Hook this mode into a UNet pipeline (`patches.unet_patch_hooks.attach`), which splits the
        guidance batch over the CFG group itself when `cfg_parallel`."""
        from compactfusion_xdit.patches import unet_patch_hooks

        return unet_patch_hooks.attach(pipe, self, cfg_parallel)

    def begin_request(self, total_steps: int) -> None:
        super().begin_request(total_steps)
        self.conv = self.norm = -1
        self.halo_shapes: list[tuple[tuple, tuple]] = []  # per convolution: shapes (to above, to below)
        self.stats_nbytes: list[int] = []  # per GroupNorm: bytes of this rank's statistics
        self.counts.update(sync_halos=0, displaced_halos=0, sync_norms=0, displaced_norms=0, whole_calls=0)

    def begin_call(self, timestep: Any) -> None:
        step = self.step
        super().begin_call(timestep)
        if self.step != step:
            self.conv = self.norm = -1
        if self.whole_now:
            self.counts["whole_calls"] += 1

    @property
    def whole_now(self) -> bool:
        """A displaced-mode warm-up step: every rank runs the whole latent through the stock layers."""
        return self.mode == "displaced" and self.step < self.warmup

    def band_rows(self, height: int, multiple: int, pixels_per_row: int = 1) -> None:
        """Refuse a latent `height` whose bands would not stay aligned through the UNet's `multiple`
        (2 ** down-samplings); the message speaks of image pixels (`pixels_per_row` per latent row)."""
        rows = self.degree * multiple
        if height % rows:
            step = rows * pixels_per_row
            raise ValueError(f"patch parallelism over {self.degree} bands needs the image height to be a multiple of "
                             f"{step} ({self.degree} bands x {multiple} for the UNet's down-sampling x {pixels_per_row} "
                             f"pixels per latent row), got {height * pixels_per_row}; use --height "
                             f"{', '.join(str(step * k) for k in range(1, 4))}, ...")

    # ----- self-attention -------------------------------------------------------------------------
    def exchange(self, layer: int, key: torch.Tensor, value: torch.Tensor, seq_dim: int,
                 text_first: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of self-attention layer `layer` (this band's tokens only) widened to every band's;
        on a whole step (every token already here) they stay as they are."""
        if self.whole_now:
            for name, x in (("k", key), ("v", value)):
                self._keep((layer, name), lambda x=x: torch.stack(x.chunk(self.degree, dim=seq_dim)))
            return key, value
        return (self._image_all(layer, "k", key.contiguous(), seq_dim),
                self._image_all(layer, "v", value.contiguous(), seq_dim))

    # ----- convolution halos ----------------------------------------------------------------------
    def halo(self, x: torch.Tensor, top: int, bottom: int) -> torch.Tensor:
        """`x` (B, C, h, W: this band) with `top` rows of the band above and `bottom` rows of the
        band below attached (zeros past the image edge)."""
        self.conv += 1
        conv = self.conv
        b, c, h, w = x.shape
        send_up = x[:, :, :bottom] if self.above is not None and bottom else None
        send_down = x[:, :, h - top:] if self.below is not None and top else None
        if conv == len(self.halo_shapes):
            self.halo_shapes.append((() if send_up is None else (b, bottom, w, c),
                                     () if send_down is None else (b, top, w, c)))
        slot = ("halo", conv)
        self.counts["displaced_halos" if self.displaced_now else "sync_halos"] += 1
        rows = self.fresh_or_previous(slot, lambda: self._post_halo(conv, send_up, send_down, x, top, bottom),
                                      f"halo rows for convolution {conv}")
        above, below = rows
        out = x.new_empty((b, c, top + h + bottom, w))
        out[:, :, top:top + h] = x
        if top:
            out[:, :, :top] = 0 if above is None else above.permute(0, 3, 1, 2)
        if bottom:
            out[:, :, top + h:] = 0 if below is None else below.permute(0, 3, 1, 2)
        return out

    def whole_conv(self, x: torch.Tensor, top: int, bottom: int) -> None:
        """A convolution of a whole step (`x`: the whole image): numbered like `halo`, and on the last
        warm-up step the rows `halo` would receive next step are kept, channels-last."""
        self.conv += 1
        lo, hi = self.local_range(x.shape[2])

        def rows():
            above = x[:, :, lo - top:lo] if self.above is not None and top else None
            below = x[:, :, hi:hi + bottom] if self.below is not None and bottom else None
            return tuple(None if r is None else r.permute(0, 2, 3, 1).contiguous() for r in (above, below))

        self._keep(("halo", self.conv), rows)

    def _post_halo(self, conv: int, send_up, send_down, x: torch.Tensor, top: int, bottom: int) -> Pending:
        """Post this band's edge rows and the receives of the neighbours'; ``wait()`` gives
        ``(rows from above or None, rows from below or None)``, channels-last."""
        b, c, _, w = x.shape
        recvs = [(self.above, "halo-down", (b, top, w, c)) if self.above is not None and top else None,
                 (self.below, "halo-up", (b, bottom, w, c)) if self.below is not None and bottom else None]
        sends = [(self.above, "halo-up", send_up), (self.below, "halo-down", send_down)]
        works, received = [], []
        comm = self.session.comm(self.group) if self.session is not None else None
        for entry in recvs:
            if entry is None:
                received.append(None)
                continue
            peer, role, shape = entry
            if comm is not None:
                work = comm.irecv((PATH, conv, role), shape, x.dtype, peer, group=self.group, device=x.device)
                received.append(work)
            else:
                buf = torch.empty(shape, dtype=x.dtype, device=x.device)
                work = dist.irecv(buf, src=peer, group=self.group)
                received.append(Pending([work], lambda buf=buf: buf))
            works.append(received[-1])
        for peer, role, rows in sends:
            if rows is None:
                continue
            rows = rows.permute(0, 2, 3, 1).contiguous()
            if comm is not None:
                works.append(comm.isend((PATH, conv, role), rows, peer, group=self.group))
            else:
                works.append(Pending([dist.isend(rows, dst=peer, group=self.group)], keep=rows))
        return Pending(works, lambda: tuple(None if r is None else r.wait() for r in received))

    # ----- GroupNorm statistics -------------------------------------------------------------------
    def norm_stats(self, local: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Whole-image (mean, variance) per (sample, group) from this band's `local` ``(B, G, 2)``
        fp32 [mean, variance]."""
        self.norm += 1
        slot = ("norm", self.norm)
        if self.norm == len(self.stats_nbytes):
            self.stats_nbytes.append(local.numel() * local.element_size())
        displaced = self.displaced_now
        gathered = self.fresh_or_previous(slot, lambda: self._gather_raw(local), f"GroupNorm statistics for norm {self.norm}")
        if displaced:
            gathered[self.rank] = local  # own statistics always fresh
        self.counts["displaced_norms" if displaced else "sync_norms"] += 1
        means, variances = gathered.unbind(-1)  # (P, B, G) each
        mean = means.mean(0)
        return mean, (variances + (means - mean).square()).mean(0)

    def whole_norm(self, band_moments) -> None:
        """A GroupNorm of a whole step: numbered like `norm_stats`, and on the last warm-up step
        `band_moments()` (every band's ``(B, G, 2)`` statistics, stacked ``(P, B, G, 2)``) is kept as
        the gathered statistics."""
        self.norm += 1
        self._keep(("norm", self.norm), band_moments)

    def _gather_raw(self, x: torch.Tensor) -> Pending:
        """Asynchronous raw all-gather of `x` (counted as raw ``patch`` traffic); ``wait()`` gives
        ``(P, *x.shape)``."""
        x = x.contiguous()
        out = torch.empty((self.degree, *x.shape), dtype=x.dtype, device=x.device)
        work = dist.all_gather_into_tensor(out, x.unsqueeze(0), group=self._group(), async_op=True)
        if self.session is not None:
            from compactfusion_xdit.core.residual import MessageKind

            nbytes = (self.degree - 1) * x.numel() * x.element_size()
            self.session.state.record(PATH, MessageKind.RAW, nbytes, nbytes, self.degree - 1)
        return Pending([work], lambda: out, keep=x)
