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

from typing import Any, Callable, Hashable, Sequence

import torch
import torch.distributed as dist

from compactfusion_xdit.comm import p2p
from compactfusion_xdit.comm.pending import Pending, hidden_since
from compactfusion_xdit.comm.plans import AllToAllPlan, GatherPlan, RecvPlan, RingPlan, SendPlan, rows_of
from compactfusion_xdit.comm.wire import BufferPool, link_key
from compactfusion_xdit.core.residual import MessageKind, ResidualState, path_of

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

    def plan(self, signature: tuple, build: Callable[[], Any]) -> Any:
        """The plan (`comm.plans`) of an exchange signature, built by `build()` the first time."""
        plan = self._plans.get(signature)
        if plan is None:
            plan = self._plans[signature] = build()
        return plan

    def _p2p_plan(self, cls, key: Hashable, src: int, dst: int, shape, dtype, device):
        """The `SendPlan`/`RecvPlan` of link (key, src, dst) for this shape, dtype and device."""
        return self.plan((cls, key, src, dst, tuple(shape), dtype, device),
                         lambda: cls(key, link_key(key, src, dst), shape, dtype, device))

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
        plan = self.plan(signature, lambda: AllToAllPlan(keys, chunk_shapes, dtype, device, ranks, me))
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
                                       rows_of(x.view(world, -1), peers), shape)
                    state.seed_stacked("recv", [link_key(key, ranks[p], ranks[me]) for p in peers],
                                       rows_of(out.view(world, -1), peers), shape)
            if start is not None:
                state.auto_observe(path_of(keys[0]), (world - 1) * sum(sizes) * xs[0].element_size(), start, xs[-1], g,
                                   hidden=hidden_since(start, pending))
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
        state = self.state
        plan = self.plan(("ag", key, tuple(x.shape), x.dtype, x.device, id(g)),
                         lambda: GatherPlan(key, x.shape, x.dtype, x.device, ranks, me))
        kind, choice, reseed = plan.decide(state)
        out = torch.empty((world, *x.shape), dtype=x.dtype, device=x.device)
        if kind is not MessageKind.CODED:
            start = state.auto_clock()
            work = dist.all_gather_into_tensor(out, x.unsqueeze(0), group=g, async_op=True)
            state.record(plan.path, kind, (world - 1) * plan.nbytes, (world - 1) * plan.nbytes, world - 1,
                         reseeds=(world - 1) * reseed, peers=plan.peer_ranks)

            def finish_raw() -> torch.Tensor:
                if kind is MessageKind.SEED and plan.others:
                    state.seed_sender(plan.own, x)
                    state.seed_stacked("recv", plan.recv_links, rows_of(out.view(world, -1), plan.others), plan.shape)
                if start is not None:
                    state.auto_observe(plan.path, (world - 1) * plan.nbytes, start, x, g,
                                       hidden=hidden_since(start, pending))
                return out

            pending = Pending([work], finish_raw, keep=x)
            return pending if async_op else pending.wait()

        send, recv = plan.wires(state, choice)
        own, receivers = plan.coders(state, choice)
        state.count_nonfinite(plan.path, own.encode(x))
        state.touched("send", (plan.own,))
        state.record(plan.path, kind, (world - 1) * plan.nbytes, (world - 1) * send.numel(), world - 1,
                     peers=plan.peer_ranks)
        work = dist.all_gather_into_tensor(recv, send, group=g, async_op=True)

        def finish_coded() -> torch.Tensor:
            for coder in receivers:
                coder.decode(out)
            out[me].copy_(x)
            state.touched("recv", plan.recv_links)
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
        x = x.contiguous()
        state = self.state
        plan = self._p2p_plan(SendPlan, key, dist.get_rank(), dst, x.shape, x.dtype, x.device)
        kind, choice, reseed = plan.decide(state)
        if kind is not MessageKind.CODED:
            if kind is MessageKind.SEED:
                state.seed_sender(plan.link, x)
            state.record(plan.path, kind, plan.nbytes, plan.nbytes, reseeds=int(reseed), peers=(dst,))
            return p2p.post(g, sends=[(x, dst, tag)])[0]
        slot = plan.slot(state, choice)
        wire, (_, coder) = slot[0], slot[1]
        state.count_nonfinite(plan.path, coder.encode(x))
        state.touched("send", (plan.link,))
        state.record(plan.path, kind, plan.nbytes, wire.numel(), peers=(dst,))
        slot[2] = sent = p2p.post(g, sends=[(wire.view(-1), dst, tag)])[0]
        return sent

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
        state = self.state
        plan = self._p2p_plan(RecvPlan, key, src, me, shape, dtype, out.device)
        kind, choice = plan.decide(state)
        if kind is not MessageKind.CODED:
            start = state.auto_clock()
            received = p2p.post(g, recvs=[(out, src, tag)])[1]

            def finish_raw() -> torch.Tensor:
                if kind is MessageKind.SEED:
                    state.seed_receiver(plan.link, out)
                if start is not None:
                    state.auto_observe(plan.path, out.numel() * out.element_size(), start, out, link=(src, me),
                                       hidden=hidden_since(start, pending))
                return out

            pending = Pending([received], finish_raw)
            return pending
        wire, coder = plan.coder(state, choice)
        received = p2p.post(g, recvs=[(wire.view(-1), src, tag)])[1]

        def finish_coded() -> torch.Tensor:
            coder.decode(out)
            state.touched("recv", (plan.link,))
            return out

        return Pending([received], finish_coded)

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

        g = self._group(group)
        tensors = tuple(t.contiguous() for t in tensors)
        if not tensors:
            raise ValueError("ring_exchange needs at least one tensor")
        ranks, me = self._ranks(g)
        shapes, dtypes, device = [tuple(t.shape) for t in tensors], [t.dtype for t in tensors], tensors[0].device
        plan = self.plan(("ring", key, tuple(shapes), tuple(dtypes), device, id(g)),
                         lambda: RingPlan(key, shapes, dtypes, device, ranks, me))
        return RingExchange(self.state, plan, tensors, g, tag)

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
