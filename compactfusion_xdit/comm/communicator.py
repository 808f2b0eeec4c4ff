"""`CompressedCommunicator`: torch.distributed collectives that carry residual-coded payloads.

Every call takes and returns plain tensors; compression happens inside, through a
`ResidualState`. The channel of each message is the caller's key extended with the global ranks
of its ends, so caches are per peer and the same key means the same link on every rank:

    all_to_all / send / recv:  (*key, src, dst)
    all_gather:                (*key, origin, "all")
    ring_exchange:             (*key, tensor_index, origin, "ring")

Message sizes are fixed for a given (step, shape, dtype) and every exchange is one collective
(or one message per hop or pair): whether a message is raw, seeds the caches or is coded both
ends decide from the state they mirror, and NaN/Inf travel marked inside the payload (see
`compactfusion_xdit.core.residual`), so no side message and no tag is needed to stay correct.
A coded exchange reads nothing back to the host: codes go straight into the pooled send buffer
and come straight out of the receive buffer; the caches of one exchange are views of one stacked
tensor per side (`ResidualState.stacked`), found in place at every step.

Byte counts (per process, in ``state.stats()``): ``raw_bytes`` is what the uncompressed exchange
would put on the wire from this process and ``sent_bytes`` what this one did. A rank's own chunk
(all-to-all) or own tensor (all-gather, ring) never leaves it and is not counted.

    comm = CompressedCommunicator(ResidualState(CompressionConfig.parse("residual-int4")), group)
    y = comm.all_to_all(("ulysses", layer, "qkv"), x)          # like all_to_all_single, equal splits
    kv = comm.all_gather(("patch", layer, "kv"), x)           # (world, *x.shape)
    for origin, (k, v) in comm.ring_exchange(("ring", layer), (k, v)): ...
    comm.isend(("pipefusion", patch), x, dst).wait(); y = comm.recv(("pipefusion", patch), shape, dtype, src)
"""

from __future__ import annotations

import math
from typing import Any, Hashable, Sequence

import torch
import torch.distributed as dist

from compactfusion_xdit.comm import p2p
from compactfusion_xdit.comm.pending import Pending
from compactfusion_xdit.comm.wire import BufferPool, link_key, peer_ranges
from compactfusion_xdit.core.residual import MessageKind, ResidualState, path_of, shape_2d

class CompressedCommunicator:
    """Compressed all-to-all, all-gather, ring exchange and point-to-point over a process group.

    `group` is the default process group of every call (None: the world); each call may pass
    another. Wire buffers are reused per (key, role), so a key must not be in flight twice.
    """

    def __init__(self, state: ResidualState, group: dist.ProcessGroup | None = None) -> None:
        self.state = state
        self.group = group
        self.buffers = BufferPool()
        self._plans: dict[tuple, Any] = {}  # per exchange signature: links, sizes, offsets, buffers
        self._group_ranks: dict[Any, tuple[list[int], int]] = {}

    # ----- helpers ------------------------------------------------------------------------------
    def _group(self, group: dist.ProcessGroup | None) -> dist.ProcessGroup:
        if group is not None:
            return group
        return self.group if self.group is not None else dist.group.WORLD

    def _ranks(self, group: dist.ProcessGroup) -> tuple[list[int], int]:
        """Global ranks of the group (index = group rank) and this process's group rank."""
        found = self._group_ranks.get(group)
        if found is None:
            found = self._group_ranks[group] = (dist.get_process_group_ranks(group), dist.get_rank(group))
        return found

    def release_buffers(self) -> None:
        """Free the pooled wire buffers and exchange plans (they are rebuilt on demand)."""
        self.buffers.release()
        self._plans.clear()

    # ----- all-to-all -----------------------------------------------------------------------------
    def all_to_all(self, key: Hashable, x: torch.Tensor, group: dist.ProcessGroup | None = None,
                   async_op: bool = False) -> torch.Tensor | Pending:
        """Like ``dist.all_to_all_single(out, x, group=group)`` with equal splits: chunk d of x
        (dim 0 split into world-size chunks) goes to group rank d; the result holds the chunk from
        each rank in rank order. With ``async_op`` returns a `Pending` whose ``wait()`` gives it.

            y = comm.all_to_all(("ulysses", 3, "qkv"), x)
        """
        pending = self.all_to_all_many([key], [x], group, async_op=True)
        result = Pending([pending], lambda: pending.wait()[0])
        return result if async_op else result.wait()

    def all_to_all_many(self, keys: Sequence[Hashable], xs: Sequence[torch.Tensor],
                        group: dist.ProcessGroup | None = None, async_op: bool = False) -> list[torch.Tensor] | Pending:
        """`all_to_all` of several tensors (each its own channel) in one collective: the messages
        of all keys for one destination travel as one block. Tensors must share the dtype and
        device; each is split along dim 0 like `all_to_all`. Returns the list of results.

            q, k, v = comm.all_to_all_many([("ulysses", 3, r) for r in "qkv"], [q, k, v])
        """
        g = self._group(group)
        ranks, me = self._ranks(g)
        world = len(ranks)
        if not keys or len(keys) != len(xs):
            raise ValueError(f"all_to_all_many needs one key per tensor, got {len(keys)} keys for {len(xs)} tensors")
        for x in xs:
            if x.dim() == 0 or x.shape[0] % world:
                raise ValueError(f"all_to_all needs dim 0 divisible by the group size {world}, got shape {tuple(x.shape)}")
            if x.dtype != xs[0].dtype or x.device != xs[0].device:
                raise ValueError("all_to_all_many needs tensors of one dtype and device")
        xs = [x.contiguous() for x in xs]
        dtype, device, state = xs[0].dtype, xs[0].device, self.state
        chunk_shapes = [(x.shape[0] // world, *x.shape[1:]) for x in xs]
        peers = [p for p in range(world) if p != me]
        signature = ("a2a", tuple(keys), tuple(chunk_shapes), dtype, device, id(g))
        plan = self._plans.get(signature)
        if plan is None:
            plan = self._plans[signature] = _AllToAllPlan(keys, chunk_shapes, dtype, device, ranks, me)
        choices, kinds, layout = plan.decide(state)
        outs = [torch.empty_like(x) for x in xs]
        if any(k is MessageKind.CODED for k in kinds):
            if len(set(kinds)) > 1:  # a mix (only with odd shapes): one collective per key
                parts = [self.all_to_all_many([k], [x], g, async_op=True) for k, x in zip(keys, xs)]
                result = Pending(parts, lambda: [p.wait()[0] for p in parts])
                return result if async_op else result.wait()
            return self._coded_all_to_all(plan, choices, layout, keys, xs, outs, g, me, async_op)

        # RAW / SEED: the tensors themselves, one block per destination
        sizes = [x.numel() // world for x in xs]
        send = xs[0].view(world, -1) if len(xs) == 1 else torch.cat([x.view(world, -1) for x in xs], dim=1)
        recv = outs[0].view(world, -1) if len(xs) == 1 else torch.empty_like(send)
        start = state.auto_clock()  # auto: raw exchanges of the warm-up are timed
        work = dist.all_to_all_single(recv, send, group=g, async_op=True)
        for key, kind, n, shape in zip(keys, kinds, sizes, chunk_shapes):
            nbytes = (world - 1) * n * xs[0].element_size()
            reseed = kind is MessageKind.SEED and state.is_reseed(key, shape, dtype)
            state.record(path_of(key), kind, nbytes, nbytes, world - 1, reseeds=(world - 1) * reseed, peers=plan.peer_ranks)

        def finish_raw() -> list[torch.Tensor]:
            offset = 0
            for key, kind, x, out, shape, n in zip(keys, kinds, xs, outs, chunk_shapes, sizes):
                if len(xs) > 1:
                    out.view(world, n).copy_(recv[:, offset:offset + n])
                offset += n
                if kind is MessageKind.SEED and peers:
                    state.seed_stacked("send", [link_key(key, ranks[me], ranks[p]) for p in peers],
                                       _rows(x.view(world, -1), peers), shape)
                    state.seed_stacked("recv", [link_key(key, ranks[p], ranks[me]) for p in peers],
                                       _rows(out.view(world, -1), peers), shape)
            if start is not None:
                state.auto_observe(path_of(keys[0]), (world - 1) * sum(sizes) * xs[0].element_size(), start, xs[-1])
            return outs

        pending = Pending([work], finish_raw, keep=(xs, send, recv))
        return pending if async_op else pending.wait()

    def _coded_all_to_all(self, plan, choices, layout, keys, xs, outs, g, me, async_op):
        state, world = self.state, len(plan.ranks)
        for i, key in enumerate(keys):
            bad = 0
            for coder in plan.coders(state, layout, i, "send"):
                bad = bad + coder.encode(xs[i])
            path = plan.paths[i]
            state.count_nonfinite(path, bad)
            state.touched("send", plan.send_links[i])
            state.record(path, MessageKind.CODED, (world - 1) * plan.chunk_nbytes[i], (world - 1) * layout.wire_sizes[i],
                         world - 1, peers=plan.peer_ranks)
        work = dist.all_to_all_single(layout.recv, layout.send, group=g, async_op=True)

        def finish_coded() -> list[torch.Tensor]:
            for i, (x, out) in enumerate(zip(xs, outs)):
                for coder in plan.coders(state, layout, i, "recv"):
                    coder.decode(out)
                rows = x.shape[0] // world
                out[me * rows:(me + 1) * rows].copy_(x[me * rows:(me + 1) * rows])
                state.touched("recv", plan.recv_links[i])
            return outs

        pending = Pending([work], finish_coded, keep=(xs, layout))
        return pending if async_op else pending.wait()

    # ----- all-gather -----------------------------------------------------------------------------
    def all_gather(self, key: Hashable, x: torch.Tensor, group: dist.ProcessGroup | None = None,
                   async_op: bool = False) -> torch.Tensor | Pending:
        """Every rank's x stacked in group-rank order: shape ``(world, *x.shape)`` (like
        ``dist.all_gather_into_tensor`` on a stacked output). Own entry exact.

            kv_all = comm.all_gather(("patch", 5, "kv"), kv)        # kv_all[r] is rank r's kv
        """
        g = self._group(group)
        ranks, me = self._ranks(g)
        world = len(ranks)
        x = x.contiguous()
        nbytes = x.numel() * x.element_size()
        path = path_of(key)
        state = self.state
        others = [o for o in range(world) if o != me]
        own = link_key(key, ranks[me], "all")
        recv_links = [link_key(key, ranks[o], "all") for o in others]
        kind = state.message_kind(key, tuple(x.shape), x.dtype, ranks=ranks)
        peer_ranks = [ranks[o] for o in others]
        if (kind is MessageKind.CODED and state.choice(key)[0] == "residual"
                and not state.has_caches([own], recv_links, tuple(x.shape), x.dtype)):
            kind = MessageKind.SEED
        out = torch.empty((world, *x.shape), dtype=x.dtype, device=x.device)
        if kind is not MessageKind.CODED:
            start = state.auto_clock()
            work = dist.all_gather_into_tensor(out, x.unsqueeze(0), group=g, async_op=True)
            reseeds = world - 1 if kind is MessageKind.SEED and state.is_reseed(key, tuple(x.shape), x.dtype) else 0
            state.record(path, kind, (world - 1) * nbytes, (world - 1) * nbytes, world - 1, reseeds=reseeds,
                         peers=peer_ranks)

            def finish_raw() -> torch.Tensor:
                if kind is MessageKind.SEED and others:
                    state.seed_sender(own, x)
                    state.seed_stacked("recv", recv_links, _rows(out.view(world, -1), others), tuple(x.shape))
                if start is not None:
                    state.auto_observe(path, (world - 1) * nbytes, start, x)
                return out

            pending = Pending([work], finish_raw, keep=x)
            return pending if async_op else pending.wait()

        n = state.wire_nbytes(tuple(x.shape), x.dtype, key)
        send = self.buffers.get(key, "ag-send", (n,), x.device)
        recv = self.buffers.get(key, "ag-recv", (world, n), x.device)
        state.encode(own, x, out=send)
        state.record(path, kind, (world - 1) * nbytes, (world - 1) * n, world - 1, peers=peer_ranks)
        work = dist.all_gather_into_tensor(recv, send.unsqueeze(0), group=g, async_op=True)

        def finish_coded() -> torch.Tensor:
            mode, codec = state.choice(key)
            residual = mode == "residual"
            out3 = out.view(world, *shape_2d(x.shape))
            base = state.stacked("recv", recv_links, tuple(x.shape), x.dtype) if residual else None
            if residual and base is None:
                raise RuntimeError(f"residual channel {recv_links!r} out of sync: coded step without caches")
            for lo, hi, at in peer_ranges(world, me):
                codec.decode_block(recv[lo:hi], 0, None if base is None else base[at:at + hi - lo], out3[lo:hi], residual)
            out[me].copy_(x)
            state.touched("recv", recv_links)
            return out

        pending = Pending([work], finish_coded, keep=(x, send, recv))
        return pending if async_op else pending.wait()

    # ----- point-to-point ------------------------------------------------------------------------
    def isend(self, key: Hashable, x: torch.Tensor, dst: int, group: dist.ProcessGroup | None = None,
              tag: int = 0) -> Pending:
        """Send x to global rank `dst`; the receiver calls `irecv`/`recv` with the same key, shape
        and dtype. Keep the returned handle and ``wait()`` it (gloo drops unwaited sends).

            h = comm.isend(("pipefusion", patch_idx), x, dst=next_rank); ...; h.wait()
        """
        g = self._group(group)
        me = dist.get_rank()
        x = x.contiguous()
        nbytes = x.numel() * x.element_size()
        path = path_of(key)
        link = link_key(key, me, dst)
        state = self.state
        kind = state.message_kind(key, tuple(x.shape), x.dtype, link, "send", ranks=(me, dst))
        if kind is not MessageKind.CODED:
            if kind is MessageKind.SEED:
                state.seed_sender(link, x)
            state.record(path, kind, nbytes, nbytes,
                         reseeds=int(kind is MessageKind.SEED and state.is_reseed(key, tuple(x.shape), x.dtype)),
                         peers=(dst,))
            return p2p.post(g, sends=[(x, dst, tag)])[0]
        wire = state.encode(link, x)
        state.record(path, kind, nbytes, wire.numel(), peers=(dst,))
        return p2p.post(g, sends=[(wire, dst, tag)])[0]

    def send(self, key: Hashable, x: torch.Tensor, dst: int, group: dist.ProcessGroup | None = None, tag: int = 0) -> None:
        """Blocking `isend`."""
        self.isend(key, x, dst, group, tag).wait()

    def irecv(self, key: Hashable, shape: Sequence[int], dtype: torch.dtype, src: int,
              group: dist.ProcessGroup | None = None, tag: int = 0, device: torch.device | str | None = None,
              out: torch.Tensor | None = None) -> Pending:
        """Receive from global rank `src` the tensor its `isend` sent; ``wait()`` returns it
        (written into `out` when given, which must be contiguous).

            y = comm.irecv(("pipefusion", patch_idx), shape, torch.float16, src=prev_rank).wait()
        """
        g = self._group(group)
        me = dist.get_rank()
        shape = tuple(shape)
        if out is None:
            out = torch.empty(shape, dtype=dtype, device=device)
        elif tuple(out.shape) != shape or out.dtype != dtype or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous {shape} {dtype} tensor, got {tuple(out.shape)} {out.dtype}")
        link = link_key(key, src, me)
        state = self.state
        kind = state.message_kind(key, shape, dtype, link, "recv", ranks=(src, me))
        if kind is not MessageKind.CODED:
            start = state.auto_clock()
            received = p2p.post(g, recvs=[(out, src, tag)])[1]

            def finish_raw() -> torch.Tensor:
                if kind is MessageKind.SEED:
                    state.seed_receiver(link, out)
                if start is not None:
                    state.auto_observe(path_of(key), out.numel() * out.element_size(), start, out)
                return out

            return Pending([received], finish_raw)
        wire = self.buffers.get(link, "p2p-recv", (state.wire_nbytes(shape, dtype, key),), out.device)
        received = p2p.post(g, recvs=[(wire, src, tag)])[1]
        return Pending([received], lambda: state.decode(link, wire, shape, dtype, out=out))

    def recv(self, key: Hashable, shape: Sequence[int], dtype: torch.dtype, src: int,
             group: dist.ProcessGroup | None = None, tag: int = 0, device: torch.device | str | None = None,
             out: torch.Tensor | None = None) -> torch.Tensor:
        """Blocking `irecv`."""
        return self.irecv(key, shape, dtype, src, group, tag, device, out).wait()

    # ----- broadcast ------------------------------------------------------------------------------
    def broadcast(self, key: Hashable, x: torch.Tensor, src: int, group: dist.ProcessGroup | None = None,
                  raw: bool = False) -> torch.Tensor:
        """Like ``dist.broadcast(x, src, group)``, in place on a contiguous `x`: the source keeps its
        exact x, every other rank gets its reconstruction. One payload serves every receiver (link
        ``(*key, src, "all")``); `raw` sends x uncoded whatever the config says. The source counts
        the traffic as one message per receiver.

            comm.broadcast(("step", "latents"), latents, src=leader)
        """
        g = self._group(group)
        state = self.state
        leader = dist.get_rank() == src
        receivers = dist.get_world_size(g) - 1
        path, link, shape = path_of(key), link_key(key, src, "all"), tuple(x.shape)
        nbytes = x.numel() * x.element_size()
        side = "send" if leader else "recv"
        ranks = self._ranks(g)[0]
        kind = MessageKind.RAW if raw else state.message_kind(key, shape, x.dtype, link, side, ranks=ranks)
        peer_ranks = [r for r in ranks if r != src]
        if kind is not MessageKind.CODED:
            start = None if raw else state.auto_clock()
            dist.broadcast(x, src=src, group=g)
            if start is not None:
                state.auto_observe(path, nbytes, start, x)
            if kind is MessageKind.SEED:
                (state.seed_sender if leader else state.seed_receiver)(link, x)
            if leader:
                reseeds = receivers if kind is MessageKind.SEED and state.is_reseed(key, shape, x.dtype) else 0
                state.record(path, kind, receivers * nbytes, receivers * nbytes, receivers, reseeds=reseeds,
                             peers=peer_ranks)
            return x
        wire = self.buffers.get(key, "bcast", (state.wire_nbytes(shape, x.dtype, link),), x.device)
        if leader:
            state.encode(link, x, out=wire)
        dist.broadcast(wire, src=src, group=g)
        if leader:
            state.record(path, kind, receivers * nbytes, receivers * wire.numel(), receivers, peers=peer_ranks)
        else:
            state.decode(link, wire, shape, x.dtype, out=x)
        return x

    # ----- ring -----------------------------------------------------------------------------------
    def ring_exchange(self, key: Hashable, tensors: Sequence[torch.Tensor], group: dist.ProcessGroup | None = None,
                      tag: int = 0):
        """Iterate ``(origin_group_rank, tensors_of_origin)`` around the ring (own first, then
        group rank me-1, me-2, ...). Each rank codes its tensors once; the payloads are forwarded
        hop by hop, and the next hop is posted before the current tensors are yielded, so transfer
        overlaps the caller's compute. Every rank's tensors must have the same shapes and dtypes,
        and the iteration must run to the end on every rank (the caches advance as it goes).

            for origin, (k, v) in comm.ring_exchange(("ring", layer), (k_local, v_local)):
                out, lse = merge(out, lse, *attention(q, k, v))
        """
        from compactfusion_xdit.comm.ring_exchange import RingExchange

        return RingExchange(self, key, tuple(tensors), self._group(group), tag)

    # ----- consistency ----------------------------------------------------------------------------
    def cache_mismatches(self, group: dist.ProcessGroup | None = None) -> list[str]:
        """Compare cache checksums across the ranks of `group` (default: the world; it must hold
        both ends of every link). Returns one line per key whose sender/receiver caches differ."""
        g = group if group is not None else dist.group.WORLD
        gathered: list = [None] * dist.get_world_size(g)
        dist.all_gather_object(gathered, self.state.cache_digests(), group=g)
        by_key: dict[Hashable, list[tuple[int, str, str]]] = {}
        for rank, digests in enumerate(gathered):
            for (side, key), digest in digests.items():
                by_key.setdefault(key, []).append((rank, side, digest))
        problems = []
        for key, entries in by_key.items():
            if len({d for _, _, d in entries}) > 1:
                problems.append(f"{key!r}: caches differ: " + ", ".join(f"rank {r} {s} {d}" for r, s, d in entries))
        return problems

    def check_caches(self, group: dist.ProcessGroup | None = None) -> None:
        """Raise RuntimeError if any sender cache differs from its receivers' (see `cache_mismatches`)."""
        problems = self.cache_mismatches(group)
        if problems:
            raise RuntimeError("residual caches diverged:\n" + "\n".join(problems))


def _rows(x2: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """x2[rows] for sorted row indices, without a copy when they are contiguous."""
    if rows == list(range(rows[0], rows[-1] + 1)):
        return x2[rows[0]:rows[-1] + 1]
    return x2[rows]


class _AllToAllPlan:
    """What an all-to-all of one signature (keys, chunk shapes, dtype, device, group) needs at
    every step, built once: link keys per key and side (peers in rank order), the peer ranges, and
    per step the message kinds and codec choices (`decide`, memoised while the step and the
    state's cache entries stay the same) with the wire layout of those codecs (`_WireLayout`)."""

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
        self._layouts: dict[tuple, _WireLayout] = {}  # per codec names
        self._memo: tuple | None = None  # ((step, generation), decision)

    def decide(self, state: ResidualState) -> tuple[list, list[MessageKind], _WireLayout | None]:
        """(choices, kinds, layout) at the state's step: RAW/SEED/CODED per key (a residual key
        whose caches are missing on this rank seeds), and the wire layout when all are coded."""
        if self._memo is not None and self._memo[0] == (state.step, state.generation):
            return self._memo[1]
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
                layout = self._layouts[names] = _WireLayout(state, self, choices)
        decision = (choices, kinds, layout)
        self._memo = ((state.step, state.generation), decision)
        return decision

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

    def coders(self, state: ResidualState, layout: _WireLayout, i: int, side: str) -> list:
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


class _WireLayout:
    """The wire of one coded all-to-all for one choice of codecs: each key's message size and
    offset in a destination's block, the send/receive buffers (the own row of the send buffer is
    never written and stays zero, so the bytes on the wire are deterministic), their per-range
    slices, the block backend of each key (decided once) and the prepared coders."""

    def __init__(self, state: ResidualState, plan: _AllToAllPlan, choices) -> None:
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
