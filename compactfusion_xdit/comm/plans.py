"""Per-exchange plans of the communicator: what a collective of one signature needs at every step,
built once and looked up again only when the state's step or cache entries change.

A plan holds the exchange's link keys, its message kinds and codec choices per step (memoised on
``(state.regime, state.generation)``), its wire buffers and its prepared coders (`Codec.prepare_block`:
on CPU a checked pointer into the compiled kernel), rebuilt when the caches' entries change
(`ResidualState.generation`). With a plan, a steady-state coded exchange costs one codec call per
tensor and side, no host read and one collective (or one message per hop or pair).

    AllToAllPlan   all_to_all / all_to_all_many (stacked caches, one block per destination)
    GatherPlan     all_gather (one payload from each rank, one stacked cache per origin)
    RingPlan       ring_exchange (a message of parts coded once at the origin, forwarded hop by hop)
    SendPlan       isend (send buffers reused once their transfer completed)
    RecvPlan       irecv
"""

from __future__ import annotations

import math

import torch

from compactfusion_xdit.comm.wire import link_key, peer_ranges
from compactfusion_xdit.core.residual import MessageKind, ResidualState, path_of, shape_2d


class _Stamped:
    """A value valid for one ``(state.regime, state.generation)``: the message kinds and codec
    choices of an exchange stay the same while the step rules and the cache entries do."""

    __slots__ = ("stamp", "value")

    def __init__(self) -> None:
        self.stamp, self.value = None, None

    def get(self, state: ResidualState):
        return self.value if self.stamp == (state.regime, state.generation) else None

    def put(self, state: ResidualState, value):
        self.stamp, self.value = (state.regime, state.generation), value
        return value


def link_coder(state: ResidualState, choice, side: str, link, shape2, dtype, wire2: torch.Tensor, offset: int):
    """A prepared coder of one link: codes (or decodes) one message of `link` at byte `offset` of
    the single row `wire2` (1, bytes), against the link's `side` cache in residual mode."""
    mode, codec = choice
    residual = mode == "residual"
    base3 = None
    if residual:
        cache = state.cache(side, link)
        if cache is None:
            raise RuntimeError(f"residual channel {link!r} out of sync: a coded message without its {side} cache")
        base3 = cache.unsqueeze(0)
    return codec.prepare_block(1, 0, shape2, dtype, base3, wire2, offset, residual, state.config.error_feedback)


def rows_of(x2: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """x2[rows] for sorted row indices, without a copy when they are contiguous."""
    if rows == list(range(rows[0], rows[-1] + 1)):
        return x2[rows[0]:rows[-1] + 1]
    return x2[rows]


class AllToAllPlan:
    """What an all-to-all of one signature (keys, chunk shapes, dtype, device, group) needs at
    every step, built once: link keys per key and side (peers in rank order), the peer ranges, and
    per step the message kinds and codec choices (`decide`, memoised while the step and the
    state's cache entries stay the same) with the wire layout of those codecs (`WireLayout`)."""

    def __init__(self, keys, chunk_shapes, dtype, device, ranks, me) -> None:
        world = len(ranks)
        peers = [p for p in range(world) if p != me]
        self.keys, self.ranks = list(keys), list(ranks)
        self.peer_ranks = [ranks[p] for p in peers]  # global ranks, for the intra/inter-node byte split
        self.paths = [path_of(k) for k in keys]
        self.send_links = [[link_key(k, ranks[me], ranks[p]) for p in peers] for k in keys]
        self.recv_links = [[link_key(k, ranks[p], ranks[me]) for p in peers] for k in keys]
        self.shapes2 = [shape_2d(c) for c in chunk_shapes]
        self.chunk_nbytes = [math.prod(c) * dtype.itemsize for c in chunk_shapes]
        self.chunk_shapes = [tuple(c) for c in chunk_shapes]
        self.dtype, self.device = dtype, device
        self.ranges = peer_ranges(world, me)
        self.no_bases = [None] * len(self.ranges)
        self._bases: dict[tuple[int, str], tuple[int, list]] = {}  # (key index, side) -> (generation, per range)
        self._layouts: dict[tuple, WireLayout] = {}  # per codec names
        self._decision = _Stamped()

    def decide(self, state: ResidualState) -> tuple[list, list[MessageKind], WireLayout | None]:
        """(choices, kinds, layout) at the state's step: RAW/SEED/CODED per key (a residual key
        whose caches are missing on this rank seeds), and the wire layout when all are coded."""
        found = self._decision.get(state)
        if found is not None:
            return found
        kinds = [state.message_kind(k, c, self.dtype, ranks=self.ranks) for k, c in zip(self.keys, self.chunk_shapes)]
        choices = [state.choice(k) for k in self.keys]
        if all(k is MessageKind.CODED for k in kinds):
            kinds = [MessageKind.SEED if mode == "residual" and not self.cached(state, i) else kind
                     for i, ((mode, _), kind) in enumerate(zip(choices, kinds))]
        layout = None
        if kinds and all(k is MessageKind.CODED for k in kinds):
            names = tuple(codec.name for _, codec in choices)
            layout = self._layouts.get(names)
            if layout is None:
                layout = self._layouts[names] = WireLayout(state, self, choices)
        return self._decision.put(state, (choices, kinds, layout))

    def bases(self, state: ResidualState, i: int, side: str) -> list[torch.Tensor]:
        """The caches of key i on `side`, one stacked slice per peer range; looked up again only
        when the state's cache entries changed (`ResidualState.generation`)."""
        found = self._bases.get((i, side))
        if found is not None and found[0] == state.generation:
            return found[1]
        links = self.send_links[i] if side == "send" else self.recv_links[i]
        stack = state.stacked(side, links, self.chunk_shapes[i], self.dtype)
        if stack is None:
            raise RuntimeError(f"residual channels {links!r} out of sync: a coded step without their caches")
        parts = [stack[at:at + hi - lo] for lo, hi, at in self.ranges]
        self._bases[(i, side)] = (state.generation, parts)
        return parts

    def coders(self, state: ResidualState, layout: WireLayout, i: int, side: str) -> list:
        """Key i's prepared block coders on `side` (`Codec.prepare_block`), one per peer range;
        rebuilt only when the caches' entries changed."""
        found = layout.coders.get((i, side))
        if found is not None and found[0] == state.generation:
            return found[1]
        mode, codec = layout.choices[i]
        residual = mode == "residual"
        bases = self.bases(state, i, side) if residual else self.no_bases
        parts = layout.send_parts if side == "send" else layout.recv_parts
        coders = [codec.prepare_block(hi - lo, lo, self.shapes2[i], self.dtype, base, wire, layout.starts[i], residual,
                                      state.config.error_feedback, backend=layout.backends[i])
                  for (lo, hi, _), base, wire in zip(self.ranges, bases, parts)]
        layout.coders[(i, side)] = (state.generation, coders)
        return coders

    def cached(self, state: ResidualState, i: int) -> bool:
        """Whether every link of key i holds its caches on this rank (else the key seeds again)."""
        try:
            self.bases(state, i, "send")
            self.bases(state, i, "recv")
        except RuntimeError:
            return False
        return True


class WireLayout:
    """The wire of one coded all-to-all for one choice of codecs: each key's message size and
    offset in a destination's block, the send/receive buffers (the own row of the send buffer is
    never written and stays zero, so the bytes on the wire are deterministic), their per-range
    slices, the block backend of each key (decided once) and the prepared coders."""

    def __init__(self, state: ResidualState, plan: AllToAllPlan, choices) -> None:
        world = len(plan.ranks)
        self.wire_sizes = [state.wire_nbytes(c, plan.dtype, k) for k, c in zip(plan.keys, plan.chunk_shapes)]
        self.starts = [sum(self.wire_sizes[:i]) for i in range(len(plan.keys))]
        total = sum(self.wire_sizes)
        self.send = torch.zeros((world, total), dtype=torch.uint8, device=plan.device)
        self.recv = torch.empty((world, total), dtype=torch.uint8, device=plan.device)
        self.send_parts = [self.send[lo:hi] for lo, hi, _ in plan.ranges]
        self.recv_parts = [self.recv[lo:hi] for lo, hi, _ in plan.ranges]
        sample = torch.empty((1, *plan.shapes2[0]), dtype=plan.dtype, device=plan.device)
        self.backends = [codec.block_backend(sample) for _, codec in choices]
        self.choices = list(choices)
        self.coders: dict[tuple[int, str], tuple[int, list]] = {}  # (key index, side) -> (generation, coders)


class GatherPlan:
    """An all-gather of one key, shape, dtype and group: the own link, the origins' links, the
    message kind per step, and per codec the wire buffers (send (1, n), receive (world, n)) with
    the prepared coders (one for the own payload, one per peer range for the stacked receive
    caches)."""

    def __init__(self, key, shape, dtype, device, ranks, me) -> None:
        world = len(ranks)
        self.key, self.shape, self.dtype, self.device, self.me = key, tuple(shape), dtype, device, me
        self.path = path_of(key)
        self.shape2 = shape_2d(self.shape)
        self.nbytes = math.prod(self.shape) * dtype.itemsize
        self.others = [o for o in range(world) if o != me]
        self.own = link_key(key, ranks[me], "all")
        self.recv_links = [link_key(key, ranks[o], "all") for o in self.others]
        self.ranks, self.peer_ranks = list(ranks), [ranks[o] for o in self.others]
        self.ranges = peer_ranges(world, me)
        self.world = world
        self._kind = _Stamped()
        self._wires: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._coders: dict[str, tuple[int, object, list]] = {}  # codec name -> (generation, send, recv)

    def decide(self, state: ResidualState) -> tuple[MessageKind, tuple, bool]:
        """(kind, (mode, codec), reseed) at the state's step: a residual key whose caches are
        missing on this rank seeds."""
        found = self._kind.get(state)
        if found is not None:
            return found
        kind = state.message_kind(self.key, self.shape, self.dtype, ranks=self.ranks)
        choice = state.choice(self.key)
        if (kind is MessageKind.CODED and choice[0] == "residual"
                and not state.has_caches([self.own], self.recv_links, self.shape, self.dtype)):
            kind = MessageKind.SEED
        reseed = kind is MessageKind.SEED and state.is_reseed(self.key, self.shape, self.dtype)
        return self._kind.put(state, (kind, choice, reseed))

    def wires(self, state: ResidualState, choice) -> tuple[torch.Tensor, torch.Tensor]:
        name = choice[1].name
        found = self._wires.get(name)
        if found is None:
            n = state.wire_nbytes(self.shape, self.dtype, self.key)
            found = self._wires[name] = (torch.empty((1, n), dtype=torch.uint8, device=self.device),
                                         torch.empty((self.world, n), dtype=torch.uint8, device=self.device))
        return found

    def coders(self, state: ResidualState, choice) -> tuple[object, list]:
        """(own payload's coder, receive coders per peer range) for the codec of `choice`."""
        name = choice[1].name
        found = self._coders.get(name)
        if found is not None and found[0] == state.generation:
            return found[1], found[2]
        send, recv = self.wires(state, choice)
        mode, codec = choice
        residual = mode == "residual"
        own = link_coder(state, choice, "send", self.own, self.shape2, self.dtype, send, 0)
        stack = state.stacked("recv", self.recv_links, self.shape, self.dtype) if residual else None
        if residual and stack is None:
            raise RuntimeError(f"residual channels {self.recv_links!r} out of sync: a coded step without their caches")
        recvs = [codec.prepare_block(hi - lo, lo, self.shape2, self.dtype,
                                     None if stack is None else stack[at:at + hi - lo], recv[lo:hi], 0, residual)
                 for lo, hi, at in self.ranges]
        self._coders[name] = (state.generation, own, recvs)
        return own, recvs


class RingPlan:
    """A ring exchange of one key, tensor shapes/dtypes and group. One message holds a part per
    tensor (raw bytes for RAW/SEED parts, the payload for CODED ones); the message of the origin
    at hop s lies in ``buffers[s % 2]``, so every coder is prepared once: the own parts' into
    buffer 0, and each (origin, part)'s from the buffer its hop lands in."""

    def __init__(self, key, shapes, dtypes, device, ranks, me) -> None:
        world = len(ranks)
        self.key, self.shapes, self.dtypes, self.device = key, [tuple(s) for s in shapes], list(dtypes), device
        self.ranks, self.me, self.world = list(ranks), me, world
        self.path = path_of(key)
        self.shapes2 = [shape_2d(s) for s in self.shapes]
        self.nbytes = [math.prod(s) * d.itemsize for s, d in zip(self.shapes, self.dtypes)]
        #: origin group rank of hop s: me, me-1, me-2, ...
        self.origins = [(me - s) % world for s in range(world)]
        self.links = [[link_key(key, i, ranks[o], "ring") for o in range(world)] for i in range(len(shapes))]
        self._layout = _Stamped()
        self._buffers: dict[int, list[torch.Tensor]] = {}  # message bytes -> the two hop buffers
        self._coders: dict[tuple, tuple[int, list]] = {}  # (layout signature) -> (generation, coders)

    def layout(self, state: ResidualState) -> tuple:
        """(kinds, choices, sizes, offsets, reseeds) of the message parts at the state's step."""
        found = self._layout.get(state)
        if found is not None:
            return found
        kinds, choices, sizes, offsets, reseeds = [], [], [], [], []
        offset = 0
        for i, (shape, dtype) in enumerate(zip(self.shapes, self.dtypes)):
            kind = state.message_kind(self.key, shape, dtype, ranks=self.ranks)
            choice = state.choice(self.key)
            if kind is MessageKind.CODED and choice[0] == "residual":
                peers = [self.links[i][o] for o in range(self.world) if o != self.me]
                if not state.has_caches([self.links[i][self.me]], peers, shape, dtype):
                    kind = MessageKind.SEED
            size = state.wire_nbytes(shape, dtype, self.key) if kind is MessageKind.CODED else self.nbytes[i]
            kinds.append(kind)
            choices.append(choice)
            sizes.append(size)
            offsets.append(offset)
            reseeds.append(int(kind is MessageKind.SEED and state.is_reseed(self.key, shape, dtype)))
            offset += size
        return self._layout.put(state, (kinds, choices, sizes, offsets, reseeds))

    def buffers(self, nbytes: int) -> list[torch.Tensor]:
        found = self._buffers.get(nbytes)
        if found is None:
            found = self._buffers[nbytes] = [torch.empty(nbytes, dtype=torch.uint8, device=self.device) for _ in (0, 1)]
        return found

    def coders(self, state: ResidualState, layout: tuple) -> list[list]:
        """coders[s][i]: hop s's coder of part i (None for a RAW/SEED part): at s = 0 it encodes
        the own tensor, later it decodes origin ``origins[s]``'s part."""
        kinds, choices, sizes, offsets, _ = layout
        signature = (tuple(kinds), tuple(c[1].name if c[1] is not None else None for c in choices), tuple(sizes))
        found = self._coders.get(signature)
        if found is not None and found[0] == state.generation:
            return found[1]
        buffers = self.buffers(sum(sizes))
        coders = []
        for s, origin in enumerate(self.origins):
            wire2 = buffers[s % 2].view(1, -1)
            side = "send" if s == 0 else "recv"
            coders.append([link_coder(state, choices[i], side, self.links[i][origin], self.shapes2[i], self.dtypes[i],
                                      wire2, offsets[i]) if kinds[i] is MessageKind.CODED else None
                           for i in range(len(self.shapes))])
        self._coders[signature] = (state.generation, coders)
        return coders


class SendPlan:
    """The isends of one link, shape and dtype: the kind per step, and send buffers with their
    prepared coders, each reused once the transfer that last used it completed (a key may be in
    flight more than once)."""

    def __init__(self, key, link, shape, dtype, device) -> None:
        self.key, self.link, self.shape, self.dtype, self.device = key, link, tuple(shape), dtype, device
        self.path = path_of(key)
        self.shape2 = shape_2d(self.shape)
        self.nbytes = math.prod(self.shape) * dtype.itemsize
        self._kind = _Stamped()
        self._slots: dict[str, list] = {}  # codec name -> [[wire, (generation, coder), pending], ...]

    def decide(self, state: ResidualState) -> tuple[MessageKind, tuple, bool]:
        found = self._kind.get(state)
        if found is not None:
            return found
        kind = state.message_kind(self.key, self.shape, self.dtype, self.link, "send", ranks=self.link[-2:])
        reseed = kind is MessageKind.SEED and state.is_reseed(self.key, self.shape, self.dtype)
        return self._kind.put(state, (kind, state.choice(self.key), reseed))

    def slot(self, state: ResidualState, choice) -> list:
        """A free [wire, (generation, coder), pending] of this codec (the caller sets pending)."""
        slots = self._slots.setdefault(choice[1].name, [])
        for slot in slots:
            if slot[2] is None or slot[2].is_completed():
                break
        else:
            n = state.wire_nbytes(self.shape, self.dtype, self.key)
            slot = [torch.empty((1, n), dtype=torch.uint8, device=self.device), None, None]
            slots.append(slot)
        if slot[1] is None or slot[1][0] != state.generation:
            slot[1] = (state.generation, link_coder(state, choice, "send", self.link, self.shape2, self.dtype, slot[0], 0))
        return slot


class RecvPlan:
    """The irecvs of one link, shape and dtype: the kind per step and, per codec, the receive
    buffer with its prepared coder."""

    def __init__(self, key, link, shape, dtype, device) -> None:
        self.key, self.link, self.shape, self.dtype, self.device = key, link, tuple(shape), dtype, device
        self.path = path_of(key)
        self.shape2 = shape_2d(self.shape)
        self._kind = _Stamped()
        self._slots: dict[str, tuple] = {}  # codec name -> (wire, generation, coder)

    def decide(self, state: ResidualState) -> tuple[MessageKind, tuple]:
        found = self._kind.get(state)
        if found is not None:
            return found
        kind = state.message_kind(self.key, self.shape, self.dtype, self.link, "recv", ranks=self.link[-2:])
        return self._kind.put(state, (kind, state.choice(self.key)))

    def coder(self, state: ResidualState, choice) -> tuple[torch.Tensor, object]:
        name = choice[1].name
        found = self._slots.get(name)
        if found is not None and found[1] == state.generation:
            return found[0], found[2]
        wire = found[0] if found is not None else torch.empty(
            (1, state.wire_nbytes(self.shape, self.dtype, self.key)), dtype=torch.uint8, device=self.device)
        coder = link_coder(state, choice, "recv", self.link, self.shape2, self.dtype, wire, 0)
        self._slots[name] = (wire, state.generation, coder)
        return wire, coder
