"""Ring exchange of coded tensors: code once at the origin, forward the payload hop by hop.

One message per hop holds a part per tensor (the raw bytes for RAW/SEED parts, the payload for
CODED parts), so its size is known to both ends and nothing else travels. The message's layout,
buffers and prepared coders come from the exchange's `plans.RingPlan`.
"""

from __future__ import annotations

import time
from typing import Iterator

import torch
import torch.distributed as dist

from compactfusion_xdit.comm import p2p
from compactfusion_xdit.comm.plans import RingPlan
from compactfusion_xdit.core.residual import MessageKind, ResidualState


class RingExchange:
    """Iterator of ``(origin_group_rank, tuple_of_tensors)``; see `CompressedCommunicator.ring_exchange`
    (which makes it from the exchange's plan and contiguous tensors).

    The own message is coded and the first hop posted on construction; each later hop is posted
    before the tensors it follows are decoded and yielded.
    """

    def __init__(self, state: ResidualState, plan: RingPlan, tensors: tuple[torch.Tensor, ...],
                 group: dist.ProcessGroup, tag: int = 0) -> None:
        self.state, self.plan, self.tensors = state, plan, tensors
        self.group, self.tag = group, tag
        self.layout = plan.layout(state)
        self.kinds = self.layout[0]
        coded = MessageKind.CODED in self.kinds
        self.coders = plan.coders(state, self.layout) if coded else None
        self.buffers = plan.buffers(sum(self.layout[2]))
        self._code_own(self.buffers[0])
        # auto: raw hops of the warm-up are timed (from posting to arrival)
        self._start = None if coded else state.auto_clock()
        self._hop = self._post_hop(self.buffers[0], self.buffers[1]) if plan.world > 1 else None
        self._started = False

    def _part(self, message: torch.Tensor, i: int) -> torch.Tensor:
        offset = self.layout[3][i]
        return message[offset:offset + self.layout[2][i]]

    def _code_own(self, message: torch.Tensor) -> None:
        plan, state = self.plan, self.state
        for i, (t, kind) in enumerate(zip(self.tensors, self.kinds)):
            link = plan.links[i][plan.me]
            if kind is MessageKind.CODED:
                state.count_nonfinite(plan.path, self.coders[0][i].encode(t))
                state.touched("send", (link,))
            else:
                self._part(message, i).copy_(t.reshape(-1).view(torch.uint8))
                if kind is MessageKind.SEED:
                    state.seed_sender(link, t)

    def _decode(self, message: torch.Tensor, hop: int) -> tuple[torch.Tensor, ...]:
        plan, state = self.plan, self.state
        origin = plan.origins[hop]
        out = []
        for i, (t, kind) in enumerate(zip(self.tensors, self.kinds)):
            y = torch.empty_like(t)
            link = plan.links[i][origin]
            if kind is MessageKind.CODED:
                self.coders[hop][i].decode(y)
                state.touched("recv", (link,))
            else:
                y.reshape(-1).view(torch.uint8).copy_(self._part(message, i))
                if kind is MessageKind.SEED:
                    state.seed_receiver(link, y)
            out.append(y)
        return tuple(out)

    def _post_hop(self, message: torch.Tensor, into: torch.Tensor):
        """Send `message` to the next rank, receive the next into `into`."""
        plan = self.plan
        _, _, sizes, _, reseeds = self.layout
        nxt, prv = plan.ranks[(plan.me + 1) % plan.world], plan.ranks[(plan.me - 1) % plan.world]
        for i, kind in enumerate(self.kinds):
            self.state.record(plan.path, kind, plan.nbytes[i], sizes[i], reseeds=reseeds[i], peers=(nxt,))
        return p2p.post(self.group, [(message, nxt, self.tag)], [(into, prv, self.tag)])

    def __iter__(self) -> Iterator[tuple[int, tuple[torch.Tensor, ...]]]:
        if self._started:
            raise RuntimeError("a RingExchange can be iterated once")
        self._started = True
        world = self.plan.world
        current, spare = self.buffers
        sent, received = self._hop or (None, None)
        start = self._start
        for hop in range(world):
            origin = self.plan.origins[hop]
            if hop > 0:
                waited_from = time.perf_counter() if start is not None else 0.0
                received.wait()
                if start is not None:  # the hop ran alongside the attention over the block before
                    self.state.auto_observe(self.plan.path, self.buffers[0].numel(), start, self.tensors[-1],
                                            self.group, hidden=max(waited_from - start, 0.0))
                    start = self.state.auto_clock()
                sent.wait()  # the previous hop's sends: frees `spare` for the next receive
                if hop < world - 1:
                    sent, received = self._post_hop(current, spare)
            if hop == 0:
                yield origin, self.tensors
            else:
                yield origin, self._decode(current, hop)
            current, spare = spare, current
