"""Compressed PipeFusion: patch activations between pipeline stages travel as residual payloads.

xfuser's ``PipelineGroupCoordinator`` (``core/distributed/group_coordinator.py``) moves every
tensor between stages: hidden states and latents per patch, the text encoder states, and
HunyuanDiT's skip tensors. This module replaces its send/receive entry points so that the
asynchronous (patch) phase goes through the session's `CompressedCommunicator`
(``comm.isend`` / ``comm.irecv``) with one residual channel per (name, patch index) and link:

    key = ("pipefusion", name, segment)          # name: "latent", "encoder_hidden_states", "skip"

What is coded (the same rule on both ends, from what both ends pass to xfuser):

* Compressed: the patch phase -- ``"latent"`` per patch index (segment >= 0),
  ``"encoder_hidden_states"`` (sent with segment -1, received as 0: channel segment 0), skip
  tensors per patch index (the sender takes it from the runtime state).
* Raw, through xfuser's own code path (bitwise the stock wire): the synchronous warm-up steps
  (``--warmup_steps``: whole maps, ``"latent"`` segment -1 and ``"encoder_hidden_state"``) and the
  hand-over of the last warm-up latents to the patch phase.

Message step. Sender and receiver must agree on whether a message is RAW, SEED or CODED when they
post it, but the receiver posts its receive at another point of its loop than the sender sends
(``session.step`` differs there: the first stage posts the receive of step i's latents during step
i or i+1). Every channel carries exactly one message per patch-phase step, in order, so each end
counts the messages of a channel within the request: message k belongs to patch-phase step k, and
the residual protocol is evaluated at step k (``session.config.warmup`` counts patch-phase steps:
the first ``warmup`` messages of each channel are raw and seed the caches; the synchronous
warm-up steps never seed them, their messages are whole maps). On the sender, k + warmup_steps
equals ``session.step`` as the lifecycle patch numbers steps. Counters restart with each request
(``session.requests``).

Wire: each channel has its own point-to-point tag (`channel_tag`), so receives may complete in any
order on gloo; xfuser's own messages (shapes, synchronous steps) keep tag 0 and their order. A
message is one fixed-size tensor whatever happens (a cache re-seed is a raw message both ends
expect, NaN/Inf rows travel marked inside the payload), so on NCCL, which ignores tags, messages
match in posting order, which xfuser keeps (it posts receives in send order).

``--compression auto``: the stages are not in lock-step (a world collective at one stage's first
coded message would wait for a stage that waits for this one's activations), so the lifecycle
patch has auto agree between requests (`ResidualState.auto_between_requests`): the first request
sends every patch-phase message raw while receivers time them, and the decision is agreed when the
next request starts (the stage links probed point to point, `core.auto.probe_links`).

Receive buffers: xfuser's raw-shaped buffers stay (the pipelines read them), and are the decode
target; the wire buffer of a coded message is payload-sized. Sends are non-blocking: each
handle is kept on the coordinator until it completes (gloo sends complete only once received).

    patches.install(CompressionConfig.parse("residual-int4"))   # applies this after the gloo support
    patches.session().pipefusion.messages                         # (role, key, shape, dtype, kind) log
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from compactfusion_xdit.comm.wire import link_key
from compactfusion_xdit.patches._attrs import AttributePatcher
from compactfusion_xdit.patches.pipefusion_gloo import pending_sends

PATH = "pipefusion"
#: xfuser's name of the synchronous warm-up steps' text states (the patch phase's is plural).
SYNC_ENCODER_STATE = "encoder_hidden_state"
#: The patch phase's text states: one tensor per step, sent with segment -1, received as segment 0.
ASYNC_ENCODER_STATES = "encoder_hidden_states"
SKIP = "skip"
#: Point-to-point tag of each channel, so a receiver may complete its receives in any order; stock
#: messages use tag 0.
_NAME_TAGS = {"latent": 0, ASYNC_ENCODER_STATES: 1, SKIP: 2}


def coded_segment(name: str, segment: int) -> int | None:
    """The channel segment of a patch-phase message of (name, segment), or None when the message
    goes raw (synchronous phase). Both ends of a message get the same answer although xfuser
    spells some segments differently on the two ends."""
    if name == SYNC_ENCODER_STATE:
        return None
    if name == ASYNC_ENCODER_STATES:
        return 0
    return segment if segment >= 0 else None


class PipeFusionChannels:
    """Per-process PipeFusion state: message counters per (role, channel) in the current request
    and a log of the request's messages ``(role, key, shape, dtype, kind)`` (kind: "raw" for the
    stock path, else the residual protocol's kind)."""

    def __init__(self, session: Any) -> None:
        self.session = session
        self._request: int | None = None
        self._counts: dict[tuple, int] = {}
        self.messages: list[tuple[str, tuple, tuple[int, ...], torch.dtype, str]] = []

    def _sync_request(self) -> None:
        if self._request != self.session.requests:
            self._request = self.session.requests
            self._counts.clear()
            self.messages.clear()

    def next_index(self, role: str, key: tuple) -> int:
        """The index of the next message of `key` in direction `role` ("send"/"recv") this request."""
        self._sync_request()
        k = self._counts.get((role, key), 0)
        self._counts[(role, key)] = k + 1
        return k

    def log(self, role: str, key: tuple, shape, dtype: torch.dtype, kind: str) -> None:
        self._sync_request()
        self.messages.append((role, key, tuple(shape), dtype, kind))

    def record_raw(self, key: tuple, tensor: torch.Tensor) -> None:
        """A raw send through xfuser's own path: counted like the communicator counts RAW."""
        from compactfusion_xdit.core.residual import MessageKind

        if not isinstance(tensor, torch.Tensor):
            return  # not a tensor (xfuser 0.7.0's Flux sync loop can pass None): xfuser's own send decides
        nbytes = tensor.numel() * tensor.element_size()
        self.session.state.record(PATH, MessageKind.RAW, nbytes, nbytes)
        self.log("send", key, tensor.shape, tensor.dtype, "raw")

    @contextlib.contextmanager
    def at_message_step(self, step: int):
        """Evaluate the residual protocol at `step` (the channel's message index), then restore."""
        state = self.session.state
        saved = state.step, state.regime
        state.set_step(step)
        try:
            yield
        finally:
            state.step, state.regime = saved

    def kind_name(self, key: tuple, shape, dtype: torch.dtype, link: tuple, side: str) -> str:
        return self.session.state.message_kind(key, tuple(shape), dtype, link, side).value


# --------------------------------------------------------------------------------------------
# xfuser's groups and peers (mirrors _pipeline_isend / _pipeline_irecv and their skip variants)
# --------------------------------------------------------------------------------------------


def _send_group(pp):
    return pp.device_groups[pp.rank_in_group % 2] if pp.world_size == 2 else pp.device_group


def _recv_group(pp):
    return pp.device_groups[(pp.rank_in_group + 1) % 2] if pp.world_size == 2 else pp.device_group


def _current_skip_segment() -> int:
    """The patch index a skip tensor being sent belongs to: xfuser's skip sends carry no index;
    the loop sends it before ``next_patch()``, in patch mode only (-1: whole map, sync phase)."""
    from xfuser.core.distributed import get_runtime_state

    state = get_runtime_state()
    return int(state.pipeline_patch_idx) if getattr(state, "patch_mode", False) else -1


def _check_dtype(pp, tensor: torch.Tensor, name: str) -> None:
    if pp.dtype is not None and tensor.dtype != pp.dtype:
        raise ValueError(
            f"PipeFusion sends {name!r} as {tensor.dtype} but receive buffers are {pp.dtype}; "
            f"set engine_config.runtime_config.dtype to the model dtype ({tensor.dtype}) before the run")


# --------------------------------------------------------------------------------------------
# Coded transfers
# --------------------------------------------------------------------------------------------


def channel_tag(key: tuple) -> int:
    """The tag of channel ``(PATH, name, segment)``: 1 + 4 * segment + a per-name offset (3 for a
    name xfuser 0.7.0 does not use)."""
    _, name, segment = key
    return 1 + 4 * segment + _NAME_TAGS.get(name, 3)


def _coded_isend(channels: PipeFusionChannels, pp, key: tuple, tensor: torch.Tensor, dst: int, group):
    k = channels.next_index("send", key)
    with channels.at_message_step(k):
        link = link_key(key, torch.distributed.get_rank(), dst)
        channels.log("send", key, tensor.shape, tensor.dtype, channels.kind_name(key, tensor.shape, tensor.dtype, link, "send"))
        handle = channels.session.comm(group).isend(key, tensor, dst=dst, group=group, tag=channel_tag(key))
    pending_sends(pp).append(handle)  # gloo loses sends whose work is dropped
    return handle


def _coded_irecv(channels: PipeFusionChannels, key: tuple, out: torch.Tensor, src: int, group):
    k = channels.next_index("recv", key)
    with channels.at_message_step(k):
        link = link_key(key, src, torch.distributed.get_rank())
        channels.log("recv", key, out.shape, out.dtype, channels.kind_name(key, out.shape, out.dtype, link, "recv"))
        return channels.session.comm(group).irecv(key, out.shape, out.dtype, src=src, group=group, out=out,
                                                  tag=channel_tag(key))


# --------------------------------------------------------------------------------------------
# Replacements
# --------------------------------------------------------------------------------------------


def apply(patcher: AttributePatcher, session: Any) -> PipeFusionChannels:
    """Route PipeFusion's patch-phase traffic through `session`'s communicators (CPU and CUDA)."""
    from xfuser.core.distributed import group_coordinator

    channels = PipeFusionChannels(session)
    session.pipefusion = channels
    cls = group_coordinator.PipelineGroupCoordinator
    stock = {name: cls.__dict__[name] for name in (
        "pipeline_send", "pipeline_isend", "pipeline_recv", "recv_next",
        "pipeline_send_skip", "pipeline_isend_skip", "pipeline_recv_skip", "recv_skip_next")}

    def pipeline_isend(self, tensor, name="latent", segment_idx=-1):
        name = name or "latent"
        segment = coded_segment(name, segment_idx)
        if segment is None:
            channels.record_raw((PATH, name, segment_idx), tensor)
            return stock["pipeline_isend"](self, tensor, name=name, segment_idx=segment_idx)
        tensor = tensor.contiguous()
        _check_dtype(self, tensor, name)
        self._check_shape_and_buffer(tensor_send_to_next=tensor, name=name, segment_idx=segment_idx)
        return _coded_isend(channels, self, (PATH, name, segment), tensor, self.next_rank, _send_group(self))

    def pipeline_send(self, tensor, name="latent", segment_idx=-1):
        name = name or "latent"
        if coded_segment(name, segment_idx) is None:
            channels.record_raw((PATH, name, segment_idx), tensor)
            return stock["pipeline_send"](self, tensor, name=name, segment_idx=segment_idx)
        pipeline_isend(self, tensor, name=name, segment_idx=segment_idx).wait()

    def pipeline_recv(self, idx=-1, name="latent"):
        name = name or "latent"
        segment = coded_segment(name, idx)
        if segment is None:
            return stock["pipeline_recv"](self, idx=idx, name=name)
        self._check_shape_and_buffer(recv_prev=True, name=name, segment_idx=idx)
        buf = self.recv_buffer[name][idx]
        return _coded_irecv(channels, (PATH, name, segment), buf, self.prev_rank, _recv_group(self)).wait()

    def recv_next(self):
        if not self.recv_tasks_queue:
            raise ValueError("No more tasks to receive")
        name, idx = self.recv_tasks_queue[0]
        segment = coded_segment(name, idx)
        if segment is None:
            return stock["recv_next"](self)
        self.recv_tasks_queue.pop(0)
        self._check_shape_and_buffer(recv_prev=True, name=name, segment_idx=idx)
        handle = _coded_irecv(channels, (PATH, name, segment), self.recv_buffer[name][idx], self.prev_rank,
                              _recv_group(self))
        self.receiving_tasks.append((handle, name, idx))  # get_pipeline_recv_data waits on it

    def pipeline_isend_skip(self, tensor):
        segment = _current_skip_segment()
        key = (PATH, SKIP, segment)
        if segment < 0:
            channels.record_raw(key, tensor)
            return stock["pipeline_isend_skip"](self, tensor)
        tensor = tensor.contiguous()
        _check_dtype(self, tensor, SKIP)
        return _coded_isend(channels, self, key, tensor, self.skip_rank, self.skip_device_group)

    def pipeline_send_skip(self, tensor):
        segment = _current_skip_segment()
        if segment < 0:
            channels.record_raw((PATH, SKIP, segment), tensor)
            return stock["pipeline_send_skip"](self, tensor)
        pipeline_isend_skip(self, tensor).wait()

    def pipeline_recv_skip(self, idx=-1):
        if idx < 0:
            return stock["pipeline_recv_skip"](self, idx=idx)
        return _coded_irecv(channels, (PATH, SKIP, idx), self.skip_tensor_recv_buffer[idx], self.skip_rank,
                            self.skip_device_group).wait()

    def recv_skip_next(self):
        if not self.recv_skip_tasks_queue:
            raise ValueError("No more tasks to receive")
        idx = self.recv_skip_tasks_queue[0]
        if idx < 0:
            return stock["recv_skip_next"](self)
        self.recv_skip_tasks_queue.pop(0)
        handle = _coded_irecv(channels, (PATH, SKIP, idx), self.skip_tensor_recv_buffer[idx], self.skip_rank,
                              self.skip_device_group)
        self.receiving_skip_tasks.append((handle, None, idx))  # get_pipeline_recv_skip_data waits on it

    replacements = dict(pipeline_send=pipeline_send, pipeline_isend=pipeline_isend, pipeline_recv=pipeline_recv,
                        recv_next=recv_next, pipeline_send_skip=pipeline_send_skip,
                        pipeline_isend_skip=pipeline_isend_skip, pipeline_recv_skip=pipeline_recv_skip,
                        recv_skip_next=recv_skip_next)
    for name, fn in replacements.items():
        fn.__name__ = name
        fn.__doc__ = f"xfuser's {name}; patch-phase messages go through the compressed communicator."
        patcher.replace(cls, name, fn)
    return channels
