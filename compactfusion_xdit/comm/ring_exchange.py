"""Ring exchange of coded tensors: code once at the origin, forward the payload hop by hop.

One message per hop holds a part per tensor (the raw bytes for RAW/SEED parts, the payload for
CODED parts), so its size is known to both ends and nothing else travels.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Hashable, Iterator

import torch
import torch.distributed as dist

from compactfusion_xdit.comm import p2p
from compactfusion_xdit.comm.wire import link_key
from compactfusion_xdit.core.residual import MessageKind, path_of

if TYPE_CHECKING:
    from compactfusion_xdit.comm.communicator import CompressedCommunicator


class RingExchange:
    """Iterator of ``(origin_group_rank, tuple_of_tensors)``; see `CompressedCommunicator.ring_exchange`.

    The own message is coded and the first hop posted on construction; each later hop is posted
    before the tensors it follows are decoded and yielded.
    """

    def __init__(self, comm: CompressedCommunicator, key: Hashable, tensors: tuple[torch.Tensor, ...],
                 group: dist.ProcessGroup, tag: int = 0) -> None:
        if not tensors:
            raise ValueError("ring_exchange needs at least one tensor")
        self.state = comm.state
        self.key = key
        self.group = group
        self.tag = tag
        self.tensors = tuple(t.contiguous() for t in tensors)
        self.ranks = dist.get_process_group_ranks(group)
        self.me = dist.get_rank(group)
        self.world = len(self.ranks)
        self.path = path_of(key)
        device = self.tensors[0].device
        self.kinds, self.sizes, self.offsets = [], [], []
        offset = 0
        for i, t in enumerate(self.tensors):
            kind = self.state.message_kind(key, tuple(t.shape), t.dtype, ranks=self.ranks)
            if kind is MessageKind.CODED and self.state.choice(key)[0] == "residual" and not self._cached(i, t):
                kind = MessageKind.SEED
            size = self.state.wire_nbytes(tuple(t.shape), t.dtype, key) if kind is MessageKind.CODED else t.numel() * t.element_size()
            self.kinds.append(kind)
            self.sizes.append(size)
            self.offsets.append(offset)
            offset += size
        self.buffers = [comm.buffers.get(key, f"ring{i}", (offset,), device) for i in (0, 1)]
        self._code_own(self.buffers[0])
        # auto: raw hops of the warm-up are timed (from posting to arrival)
        self._start = self.state.auto_clock() if MessageKind.CODED not in self.kinds else None
        self._hop = self._post_hop(self.buffers[0], self.buffers[1]) if self.world > 1 else None
        self._started = False

    def _link(self, part: int, origin: int) -> tuple:
        return link_key(self.key, part, self.ranks[origin], "ring")

    def _cached(self, i: int, t: torch.Tensor) -> bool:
        """Whether this rank holds every cache of part i: its own (send) and each origin's (recv)."""
        origins = [self._link(i, o) for o in range(self.world) if o != self.me]
        return self.state.has_caches([self._link(i, self.me)], origins, tuple(t.shape), t.dtype)

    def _part(self, message: torch.Tensor, i: int) -> torch.Tensor:
        return message[self.offsets[i]:self.offsets[i] + self.sizes[i]]

    def _code_own(self, message: torch.Tensor) -> None:
        for i, (t, kind) in enumerate(zip(self.tensors, self.kinds)):
            part = self._part(message, i)
            if kind is MessageKind.CODED:
                self.state.encode(self._link(i, self.me), t, out=part)
            else:
                part.copy_(t.reshape(-1).view(torch.uint8))
                if kind is MessageKind.SEED:
                    self.state.seed_sender(self._link(i, self.me), t)

    def _decode(self, message: torch.Tensor, origin: int) -> tuple[torch.Tensor, ...]:
        out = []
        for i, (t, kind) in enumerate(zip(self.tensors, self.kinds)):
            part = self._part(message, i)
            if kind is MessageKind.CODED:
                out.append(self.state.decode(self._link(i, origin), part, tuple(t.shape), t.dtype))
            else:
                y = torch.empty_like(t)
                y.reshape(-1).view(torch.uint8).copy_(part)
                if kind is MessageKind.SEED:
                    self.state.seed_receiver(self._link(i, origin), y)
                out.append(y)
        return tuple(out)

    def _post_hop(self, message: torch.Tensor, into: torch.Tensor):
        """Send `message` to the next rank, receive the next into `into`."""
        nxt, prv = self.ranks[(self.me + 1) % self.world], self.ranks[(self.me - 1) % self.world]
        for i, t in enumerate(self.tensors):
            nbytes = t.numel() * t.element_size()
            reseed = self.kinds[i] is MessageKind.SEED and self.state.is_reseed(self.key, tuple(t.shape), t.dtype)
            self.state.record(self.path, self.kinds[i], nbytes, self.sizes[i], reseeds=int(reseed), peers=(nxt,))
        return p2p.post(self.group, [(message, nxt, self.tag)], [(into, prv, self.tag)])

    def __iter__(self) -> Iterator[tuple[int, tuple[torch.Tensor, ...]]]:
        if self._started:
            raise RuntimeError("a RingExchange can be iterated once")
        self._started = True
        current, spare = self.buffers
        sent, received = self._hop or (None, None)
        start = self._start
        for step in range(self.world):
            origin = (self.me - step) % self.world
            if step > 0:
                received.wait()
                if start is not None:
                    self.state.auto_observe(self.path, self.buffers[0].numel(), start, self.tensors[-1])
                    start = self.state.auto_clock()
                sent.wait()  # the previous hop's sends: frees `spare` for the next receive
                if step < self.world - 1:
                    sent, received = self._post_hop(current, spare)
            if step == 0:
                yield origin, self.tensors
            else:
                yield origin, self._decode(current, origin)
            current, spare = spare, current
