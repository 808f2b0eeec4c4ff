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
would put on the wire from this process and ``sent_bytes`` what this one did. A rank's own chunk (all-to-all) or own tensor (all-gather, ring) never
leaves it and is not counted.

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

    # ----- helpers ------------------------------------------------------------------------------
    def _group(self, group: dist.ProcessGroup | None) -> dist.ProcessGroup:
        if group is not None:
            return group
        return self.group if self.group is not None else dist.group.WORLD

    @staticmethod
    def _ranks(group: dist.ProcessGroup) -> tuple[list[int], int]:
        """Global ranks of the group (index = group rank) and this process's group rank."""
        return dist.get_process_group_ranks(group), dist.get_rank(group)

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
        kinds = [state.message_kind(k, c, dtype) for k, c in zip(keys, chunk_shapes)]
        outs = [torch.empty_like(x) for x in xs]
        if all(k is MessageKind.CODED for k in kinds):
            plan = self._a2a_plan(keys, chunk_shapes, dtype, device, ranks, me)
            kinds = [MessageKind.SEED if state.choice(k)[0] == "residual" and not plan.cached(state, i) else kind
                     for i, (k, kind) in enumerate(zip(keys, kinds))]
        if any(k is MessageKind.CODED for k in kinds):
            if len(set(kinds)) > 1:  # a mix (only with odd shapes): one collective per key
                parts = [self.all_to_all_many([k], [x], g, async_op=True) for k, x in zip(keys, xs)]
                result = Pending(parts, lambda: [p.wait()[0] for p in parts])
                return result if async_op else result.wait()
            return self._coded_all_to_all(keys, xs, outs, chunk_shapes, g, ranks, me, async_op)

        # RAW / SEED: the tensors themselves, one block per destination
        sizes = [x.numel() // world for x in xs]
        send = xs[0].view(world, -1) if len(xs) == 1 else torch.cat([x.view(world, -1) for x in xs], dim=1)
        recv = outs[0].view(world, -1) if len(xs) == 1 else torch.empty_like(send)
        work = dist.all_to_all_single(recv, send, group=g, async_op=True)
        reseed = state.step >= state.config.warmup
        for key, kind, n in zip(keys, kinds, sizes):
            nbytes = (world - 1) * n * xs[0].element_size()
            state.record(path_of(key), kind, nbytes, nbytes, world - 1,
                         reseeds=(world - 1) if kind is MessageKind.SEED and reseed else 0)

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
            return outs

        pending = Pending([work], finish_raw, keep=(xs, send, recv))
        return pending if async_op else pending.wait()

    def _coded_all_to_all(self, keys, xs, outs, chunk_shapes, g, ranks, me, async_op):
        world, state, dtype, device = len(ranks), self.state, xs[0].dtype, xs[0].device
        plan = self._a2a_plan(keys, chunk_shapes, dtype, device, ranks, me)
        send, recv = plan.send, plan.recv
        ef = state.config.error_feedback
        for i, key in enumerate(keys):
            mode, codec = state.choice(key)
            residual = mode == "residual"
            x3 = xs[i].view(world, *plan.shapes2[i])
            base = state.stacked("send", plan.send_links[i], chunk_shapes[i], dtype, device) if residual else None
            if residual and base is None:
                raise RuntimeError(f"residual channel {plan.send_links[i]!r} out of sync: coded step without caches")
            bad = 0
            for lo, hi, at in plan.ranges:
                bad = bad + codec.encode_block(x3[lo:hi], None if base is None else base[at:at + hi - lo],
                                               send[lo:hi], plan.starts[i], residual, ef)
            state.count_nonfinite(path_of(key), bad)
            state.touched("send", plan.send_links[i])
            state.record(path_of(key), MessageKind.CODED, (world - 1) * plan.chunk_nbytes[i],
                         (world - 1) * plan.wire_sizes[i], world - 1)
        work = dist.all_to_all_single(recv, send, group=g, async_op=True)

        def finish_coded() -> list[torch.Tensor]:
            for i, key in enumerate(keys):
                mode, codec = state.choice(key)
                residual = mode == "residual"
                x3, out3 = xs[i].view(world, *plan.shapes2[i]), outs[i].view(world, *plan.shapes2[i])
                base = state.stacked("recv", plan.recv_links[i], chunk_shapes[i], dtype, device) if residual else None
                if residual and base is None:
                    raise RuntimeError(f"residual channel {plan.recv_links[i]!r} out of sync: coded step without caches")
                for lo, hi, at in plan.ranges:
                    codec.decode_block(recv[lo:hi], plan.starts[i], None if base is None else base[at:at + hi - lo],
                                       out3[lo:hi], residual)
                out3[me].copy_(x3[me])
                state.touched("recv", plan.recv_links[i])
            return outs

        pending = Pending([work], finish_coded, keep=(xs, send, recv))
        return pending if async_op else pending.wait()

    def _a2a_plan(self, keys, chunk_shapes, dtype, device, ranks, me) -> _AllToAllPlan:
        codec_names = tuple(self.state.choice(k)[1].name for k in keys)  # a schedule may change codecs per step
        return self._plan(("a2a", tuple(keys), tuple(chunk_shapes), dtype, device, tuple(ranks), me, codec_names),
                          lambda: _AllToAllPlan(self, keys, chunk_shapes, dtype, device, ranks, me))

    def _plan(self, signature: tuple, build):
        plan = self._plans.get(signature)
        if plan is None:
            plan = self._plans[signature] = build()
        return plan

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
        kind = state.message_kind(key, tuple(x.shape), x.dtype)
        if kind is MessageKind.CODED and state.choice(key)[0] == "residual" and not (
                state.has_cache("send", own, tuple(x.shape), x.dtype)
                and state.stacked("recv", recv_links, tuple(x.shape), x.dtype, x.device) is not None):
            kind = MessageKind.SEED
        out = torch.empty((world, *x.shape), dtype=x.dtype, device=x.device)
        if kind is not MessageKind.CODED:
            work = dist.all_gather_into_tensor(out, x.unsqueeze(0), group=g, async_op=True)
            reseeds = world - 1 if kind is MessageKind.SEED and state.step >= state.config.warmup else 0
            state.record(path, kind, (world - 1) * nbytes, (world - 1) * nbytes, world - 1, reseeds=reseeds)

            def finish_raw() -> torch.Tensor:
                if kind is MessageKind.SEED and others:
                    state.seed_sender(own, x)
                    state.seed_stacked("recv", recv_links, _rows(out.view(world, -1), others), tuple(x.shape))
                return out

            pending = Pending([work], finish_raw, keep=x)
            return pending if async_op else pending.wait()

        n = state.wire_nbytes(tuple(x.shape), x.dtype, key)
        send = self.buffers.get(key, "ag-send", (n,), x.device)
        recv = self.buffers.get(key, "ag-recv", (world, n), x.device)
        state.encode(own, x, out=send)
        state.record(path, kind, (world - 1) * nbytes, (world - 1) * n, world - 1)
        work = dist.all_gather_into_tensor(recv, send.unsqueeze(0), group=g, async_op=True)

        def finish_coded() -> torch.Tensor:
            mode, codec = state.choice(key)
            residual = mode == "residual"
            out3 = out.view(world, *shape_2d(x.shape))
            base = state.stacked("recv", recv_links, tuple(x.shape), x.dtype, x.device) if residual else None
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
        kind = state.message_kind(key, tuple(x.shape), x.dtype, link, "send")
        if kind is not MessageKind.CODED:
            if kind is MessageKind.SEED:
                state.seed_sender(link, x)
            state.record(path, kind, nbytes, nbytes, reseeds=int(kind is MessageKind.SEED and state.step >= state.config.warmup))
            return p2p.post(g, sends=[(x, dst, tag)])[0]
        wire = state.encode(link, x)
        state.record(path, kind, nbytes, wire.numel())
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
        kind = state.message_kind(key, shape, dtype, link, "recv")
        if kind is not MessageKind.CODED:
            received = p2p.post(g, recvs=[(out, src, tag)])[1]

            def finish_raw() -> torch.Tensor:
                if kind is MessageKind.SEED:
                    state.seed_receiver(link, out)
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
        kind = MessageKind.RAW if raw else state.message_kind(key, shape, x.dtype, link, side)
        if kind is not MessageKind.CODED:
            dist.broadcast(x, src=src, group=g)
            if kind is MessageKind.SEED:
                (state.seed_sender if leader else state.seed_receiver)(link, x)
            if leader:
                reseeds = receivers if kind is MessageKind.SEED and state.step >= state.config.warmup else 0
                state.record(path, kind, receivers * nbytes, receivers * nbytes, receivers, reseeds=reseeds)
            return x
        wire = self.buffers.get(key, "bcast", (state.wire_nbytes(shape, x.dtype, link),), x.device)
        if leader:
            state.encode(link, x, out=wire)
        dist.broadcast(wire, src=src, group=g)
        if leader:
            state.record(path, kind, receivers * nbytes, receivers * wire.numel(), receivers)
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
    """What a coded all-to-all of one signature (keys, chunk shapes, dtype, device, group, codecs)
    needs at every step, built once: link keys per key and side (peers in rank order), wire sizes
    and offsets of each key's message in a destination's block, and the pooled buffers (the own
    row of the send buffer is never written and stays zero, so the wire is deterministic)."""

    def __init__(self, comm: CompressedCommunicator, keys, chunk_shapes, dtype, device, ranks, me) -> None:
        state, world = comm.state, len(ranks)
        peers = [p for p in range(world) if p != me]
        self.send_links = [[link_key(k, ranks[me], ranks[p]) for p in peers] for k in keys]
        self.recv_links = [[link_key(k, ranks[p], ranks[me]) for p in peers] for k in keys]
        self.shapes2 = [shape_2d(c) for c in chunk_shapes]
        self.wire_sizes = [state.wire_nbytes(c, dtype, k) for k, c in zip(keys, chunk_shapes)]
        self.chunk_nbytes = [math.prod(c) * dtype.itemsize for c in chunk_shapes]
        self.starts = [sum(self.wire_sizes[:i]) for i in range(len(keys))]
        self.chunk_shapes = [tuple(c) for c in chunk_shapes]
        self.dtype, self.device = dtype, device
        self.ranges = peer_ranges(world, me)
        total = sum(self.wire_sizes)
        self.send = torch.zeros((world, total), dtype=torch.uint8, device=device)
        self.recv = torch.empty((world, total), dtype=torch.uint8, device=device)

    def cached(self, state: ResidualState, i: int) -> bool:
        """Whether every link of key i holds its caches on this rank (else the key seeds again)."""
        shape, dtype, device = self.chunk_shapes[i], self.dtype, self.device
        return (state.stacked("send", self.send_links[i], shape, dtype, device) is not None
                and state.stacked("recv", self.recv_links[i], shape, dtype, device) is not None)
