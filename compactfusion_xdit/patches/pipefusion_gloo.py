"""PipeFusion's point-to-point traffic over gloo (machines without CUDA only).

xfuser's ``PipelineGroupCoordinator`` (``core/distributed/group_coordinator.py``) was written for
NCCL, where a small send completes without waiting for its receiver. Under gloo a send's work
completes only once the peer has posted the matching receive, which breaks three things:

* ``_communicate_shapes`` (first send/receive of each named patch) posts the shape messages with
  ``batch_isend_irecv`` and waits on every request, sends included. In the asynchronous PipeFusion
  loop the last stage sends its first patch back to the first stage while the first stage is
  sending its second patch forward: both wait on a send, neither posts the receive -> deadlock.
  Replacement: post sends and keep their work handles; wait only on receives.
* ``_pipeline_isend`` / ``_pipeline_isend_skip`` return the gloo work and the async loop drops it;
  a dropped gloo send work can lose the message. Wrapper: keep every send work until it completes.
* ``group_coordinator.synchronize`` is ``torch.cuda.synchronize`` (called twice per shape
  exchange); it fails on a CPU-only build. Replacement: a no-op.

Receive buffers are allocated in ``runtime_config.dtype`` (fp16 by default): the worker sets it to
the model's dtype before the run (``compactfusion_xdit.rank.worker.run_pipeline``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from compactfusion_xdit.patches._attrs import AttributePatcher


def apply(patcher: AttributePatcher) -> None:
    if torch.cuda.is_available():
        return
    from xfuser.core.distributed import group_coordinator

    coordinator = group_coordinator.PipelineGroupCoordinator
    patcher.replace(group_coordinator, "synchronize", _no_device_synchronize)
    patcher.replace(coordinator, "_communicate_shapes", _communicate_shapes)
    patcher.replace(coordinator, "_pipeline_isend", _keeping_send_work(coordinator.__dict__["_pipeline_isend"]))
    patcher.replace(coordinator, "_pipeline_isend_skip", _keeping_send_work(coordinator.__dict__["_pipeline_isend_skip"]))


def _no_device_synchronize(device=None) -> None:
    """CPU ops complete before they return: nothing to synchronise."""


def pending_sends(coordinator) -> list:
    """The send works ``coordinator`` still holds (completed ones are dropped on the next send)."""
    pending = coordinator.__dict__.setdefault("_cfx_pending_sends", [])
    pending[:] = [work for work in pending if not work.is_completed()]
    return pending


def _keeping_send_work(send):
    def keep_send_work(self, tensor):
        work = send(self, tensor)
        pending_sends(self).append(work)
        return work

    keep_send_work.__name__ = send.__name__
    keep_send_work.__doc__ = f"xfuser's {send.__name__}, keeping the gloo send work alive until it completes."
    return keep_send_work


def _communicate_shapes(self, tensor_send_to_next=None, recv_prev=False):
    """Send this stage's outgoing shape to the next stage and/or receive the previous stage's.

    Same messages, peers and group as xfuser's (rank count, then the sizes, both int64), but a
    send never blocks: its work is kept (see ``pending_sends``) and only receives are waited on.
    Returns the received shape, or ``torch.Size([0, 0, 0])`` when nothing was received (as xfuser).
    """
    if tensor_send_to_next is not None:
        sizes = torch.tensor(tensor_send_to_next.size(), dtype=torch.int64, device=self.device)
        ndim = torch.tensor([sizes.numel()], dtype=torch.int64, device=self.device)
        pending = pending_sends(self)
        pending.append(dist.isend(ndim, dst=self.next_rank, group=self.device_group))
        pending.append(dist.isend(sizes, dst=self.next_rank, group=self.device_group))
    if not recv_prev:
        return torch.Size([0, 0, 0])
    ndim = torch.empty(1, dtype=torch.int64, device=self.device)
    dist.irecv(ndim, src=self.prev_rank, group=self.device_group).wait()
    sizes = torch.empty(int(ndim.item()), dtype=torch.int64, device=self.device)
    dist.irecv(sizes, src=self.prev_rank, group=self.device_group).wait()
    return torch.Size(sizes.tolist())
