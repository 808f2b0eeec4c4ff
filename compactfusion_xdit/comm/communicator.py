"""`CompressedCommunicator`: torch.distributed collectives that carry residual-coded payloads.

Every call takes and returns plain tensors; compression happens inside, through a
`ResidualState`. The channel of each message is the caller's key extended with the global ranks
of its ends, so caches are per peer and the same key means the same link on every rank:

    all_to_all / send / recv:  (*key, src, dst)
    all_gather:                (*key, origin, "all")
    ring_exchange:             (*key, tensor_index, origin, "ring")

Message sizes are fixed for a given (step, shape, dtype), so collectives keep equal splits
(see `compactfusion_xdit.core.residual` for the RAW/SEED/CODED rules). A CODED message whose flag
says the raw tensor follows (new key, reset, shape change, NaN/Inf at the sender) is completed by
a side message between exactly the pair involved (all-gather: a broadcast from the flagged rank,
since every rank is its receiver). Side messages use tag ``tag + FALLBACK_TAG_OFFSET (+ part)``.

Byte counts (per process, in ``state.stats()``): ``raw_bytes`` is what the uncompressed exchange
would put on the wire from this process and ``sent_bytes`` what this one did (flag bytes and
fallback tensors included). A rank's own chunk (all-to-all) or own tensor (all-gather, ring) never
leaves it and is not counted.

    comm = CompressedCommunicator(ResidualState(CompressionConfig.parse("residual-int4")), group)
    y = comm.all_to_all(("ulysses", layer, "qkv"), x)          # like all_to_all_single, equal splits
    kv = comm.all_gather(("patch", layer, "kv"), x)           # (world, *x.shape)
    for origin, (k, v) in comm.ring_exchange(("ring", layer), (k, v)): ...
    comm.isend(("pipefusion", patch), x, dst).wait(); y = comm.recv(("pipefusion", patch), shape, dtype, src)
"""

from __future__ import annotations

from typing import Hashable, Sequence

import torch
import torch.distributed as dist

from compactfusion_xdit.comm import p2p
from compactfusion_xdit.comm.pending import Pending
from compactfusion_xdit.comm.wire import FALLBACK_TAG_OFFSET, BufferPool, finite_rows, finite_rows_each, link_key
from compactfusion_xdit.core.residual import FLAG_RAW_FOLLOWS, MessageKind, ResidualState, fallback_follows, path_of

class CompressedCommunicator:
    """Compressed all-to-all, all-gather, ring exchange and point-to-point over a process group.

    `group` is the default process group of every call (None: the world); each call may pass
    another. Wire buffers are reused per (key, role), so a key must not be in flight twice.
    """

    def __init__(self, state: ResidualState, group: dist.ProcessGroup | None = None) -> None:
        self.state = state
        self.group = group
        self.buffers = BufferPool()

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
        """Free the pooled wire buffers (they are rebuilt on demand)."""
        self.buffers.release()

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
        dtype, state = xs[0].dtype, self.state
        chunk_shapes = [(x.shape[0] // world, *x.shape[1:]) for x in xs]
        kinds = [state.message_kind(k, c, dtype) for k, c in zip(keys, chunk_shapes)]
        outs = [torch.empty_like(x) for x in xs]
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
        for key, kind, n in zip(keys, kinds, sizes):
            nbytes = (world - 1) * n * xs[0].element_size()
            state.record(path_of(key), kind, nbytes, nbytes, world - 1)

        def finish_raw() -> list[torch.Tensor]:
            offset = 0
            for key, kind, x, out, shape, n in zip(keys, kinds, xs, outs, chunk_shapes, sizes):
                if len(xs) > 1:
                    out.view(world, n).copy_(recv[:, offset:offset + n])
                offset += n
                if kind is MessageKind.SEED:
                    chunks, out_chunks = x.view(world, *shape), out.view(world, *shape)
                    sent_ok, got_ok = finite_rows(x.view(world, -1)), finite_rows(out.view(world, -1))
                    for peer in range(world):
                        if peer != me:
                            state.seed_sender(link_key(key, ranks[me], ranks[peer]), chunks[peer], sent_ok[peer])
                            state.seed_receiver(link_key(key, ranks[peer], ranks[me]), out_chunks[peer], got_ok[peer])
            return outs

        pending = Pending([work], finish_raw, keep=(xs, send, recv))
        return pending if async_op else pending.wait()

    def _coded_all_to_all(self, keys, xs, outs, chunk_shapes, g, ranks, me, async_op):
        world, state, dtype = len(ranks), self.state, xs[0].dtype
        peers = [p for p in range(world) if p != me]
        wire_sizes = [state.wire_nbytes(shape, dtype, key) for key, shape in zip(keys, chunk_shapes)]
        starts = [sum(wire_sizes[:i]) for i in range(len(keys))]
        send = self.buffers.get(tuple(keys), "a2a-send", (world, sum(wire_sizes)), xs[0].device)
        recv = self.buffers.get(tuple(keys), "a2a-recv", (world, sum(wire_sizes)), xs[0].device)
        fallback_to = []  # (key index, peer): the raw chunk follows point-to-point
        finite = finite_rows_each(xs, world)
        for i, (key, x, shape, n, start, ok) in enumerate(zip(keys, xs, chunk_shapes, wire_sizes, starts, finite)):
            chunks = x.view(world, *shape)
            sent = state.encode_many([link_key(key, ranks[me], ranks[p]) for p in peers], [chunks[p] for p in peers],
                                     [send[p, start:start + n] for p in peers], [ok[p] for p in peers])
            fallback_to += [(i, p) for p, msg in zip(peers, sent) if msg.fallback is not None]
            chunk_nbytes = x.numel() // world * x.element_size()
            state.record(path_of(key), MessageKind.CODED, (world - 1) * chunk_nbytes,
                         (world - 1) * n + sum(j == i for j, _ in fallback_to) * chunk_nbytes, world - 1)
        send[me].zero_()  # never read; keeps the bytes on the wire deterministic
        work = dist.all_to_all_single(recv, send, group=g, async_op=True)

        def finish_coded() -> list[torch.Tensor]:
            flags = recv[:, [start + n - 1 for start, n in zip(starts, wire_sizes)]].tolist()  # [source][key]
            fallback_from = [(i, s) for i in range(len(keys)) for s in peers if flags[s][i] == FLAG_RAW_FOLLOWS]
            views = [(x.view(world, *shape), out.view(world, *shape)) for x, out, shape in zip(xs, outs, chunk_shapes)]
            sent, received = p2p.post(g, [(views[i][0][d], ranks[d], FALLBACK_TAG_OFFSET + i) for i, d in fallback_to],
                                      [(views[i][1][s], ranks[s], FALLBACK_TAG_OFFSET + i) for i, s in fallback_from])
            received.wait()
            sent.wait()
            for i, (key, shape, n, start) in enumerate(zip(keys, chunk_shapes, wire_sizes, starts)):
                chunks, out_chunks = views[i]
                out_chunks[me].copy_(chunks[me])
                raw_from = {s for j, s in fallback_from if j == i}
                state.decode_many([link_key(key, ranks[s], ranks[me]) for s in peers],
                                  [recv[s, start:start + n] for s in peers], shape, dtype,
                                  [out_chunks[s] for s in peers], [out_chunks[s] if s in raw_from else None for s in peers])
            return outs

        pending = Pending([work], finish_coded, keep=(xs, send, recv))
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
        kind = state.message_kind(key, tuple(x.shape), x.dtype)
        out = torch.empty((world, *x.shape), dtype=x.dtype, device=x.device)
        if kind is not MessageKind.CODED:
            work = dist.all_gather_into_tensor(out, x.unsqueeze(0), group=g, async_op=True)
            state.record(path, kind, (world - 1) * nbytes, (world - 1) * nbytes, world - 1)

            def finish_raw() -> torch.Tensor:
                if kind is MessageKind.SEED:
                    state.seed_sender(link_key(key, ranks[me], "all"), x)
                    ok = finite_rows(out.view(world, -1))
                    for o in range(world):
                        if o != me:
                            state.seed_receiver(link_key(key, ranks[o], "all"), out[o], ok[o])
                return out

            pending = Pending([work], finish_raw, keep=x)
            return pending if async_op else pending.wait()

        n = state.wire_nbytes(tuple(x.shape), x.dtype, key)
        send = self.buffers.get(key, "ag-send", (n,), x.device)
        recv = self.buffers.get(key, "ag-recv", (world, n), x.device)
        msg = state.encode(link_key(key, ranks[me], "all"), x, out=send)
        fell_back = msg.fallback is not None
        state.record(path, kind, (world - 1) * nbytes, (world - 1) * (n + (nbytes if fell_back else 0)), world - 1)
        work = dist.all_gather_into_tensor(recv, send.unsqueeze(0), group=g, async_op=True)

        def finish_coded() -> torch.Tensor:
            out[me].copy_(x)
            flags = recv[:, -1].tolist()
            flagged = [o for o in range(world) if flags[o] == FLAG_RAW_FOLLOWS]
            for o in flagged:  # every rank sees every flag: broadcasts in the same order everywhere
                dist.broadcast(x if o == me else out[o], src=ranks[o], group=g)
            others = [o for o in range(world) if o != me]
            state.decode_many([link_key(key, ranks[o], "all") for o in others], [recv[o] for o in others],
                              tuple(x.shape), x.dtype, [out[o] for o in others],
                              [out[o] if o in flagged else None for o in others])
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
        kind = self.state.message_kind(key, tuple(x.shape), x.dtype)
        if kind is not MessageKind.CODED:
            if kind is MessageKind.SEED:
                self.state.seed_sender(link, x)
            self.state.record(path, kind, nbytes, nbytes)
            return p2p.post(g, sends=[(x, dst, tag)])[0]
        msg = self.state.encode(link, x)
        sends = [(msg.wire, dst, tag)]
        if msg.fallback is not None:
            sends.append((x, dst, tag + FALLBACK_TAG_OFFSET))
        self.state.record(path, kind, nbytes, msg.wire.numel() + (nbytes if msg.fallback is not None else 0))
        return p2p.post(g, sends=sends)[0]

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
        kind = state.message_kind(key, shape, dtype)
        if kind is not MessageKind.CODED:
            received = p2p.post(g, recvs=[(out, src, tag)])[1]

            def finish_raw() -> torch.Tensor:
                if kind is MessageKind.SEED:
                    state.seed_receiver(link, out)
                return out

            return Pending([received], finish_raw)
        wire = torch.empty(state.wire_nbytes(shape, dtype, key), dtype=torch.uint8, device=out.device)
        received = p2p.post(g, recvs=[(wire, src, tag)])[1]

        def finish_coded() -> torch.Tensor:
            raw = fallback_follows(wire)
            if raw:
                p2p.post(g, recvs=[(out, src, tag + FALLBACK_TAG_OFFSET)])[1].wait()
            return state.decode(link, wire, shape, dtype, fallback=out if raw else None, out=out, raw_follows=raw)

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
        kind = MessageKind.RAW if raw else state.message_kind(key, shape, x.dtype)
        if kind is not MessageKind.CODED:
            dist.broadcast(x, src=src, group=g)
            if kind is MessageKind.SEED:
                (state.seed_sender if leader else state.seed_receiver)(link, x)
            if leader:
                state.record(path, kind, receivers * nbytes, receivers * nbytes, receivers)
            return x
        wire = self.buffers.get(key, "bcast", (state.wire_nbytes(shape, x.dtype, link),), x.device)
        if leader:
            state.encode(link, x, out=wire)
        dist.broadcast(wire, src=src, group=g)
        follows = fallback_follows(wire)  # the source had no cache or x was not finite: x follows
        if follows:
            dist.broadcast(x, src=src, group=g)
        if leader:
            state.record(path, kind, receivers * nbytes, receivers * (wire.numel() + (nbytes if follows else 0)),
                         receivers)
        else:
            state.decode(link, wire, shape, x.dtype, fallback=x if follows else None, out=x, raw_follows=follows)
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
