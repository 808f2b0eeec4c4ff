"""`CompressedCommunicator`: torch.distributed collectives that carry residual-coded payloads.

Every call takes and returns plain tensors; compression happens inside, through a
`ResidualState`. The channel of each message is the caller's key extended with the global ranks
of its ends, so caches are per peer and the same key means the same link on every rank:

    all_to_all / send / recv:  (*key, src, dst)
    all_gather:                (*key, origin, "all")
    ring_exchange:             (*key, tensor_index, origin, "ring")

Message sizes are fixed for a given (step, shape, dtype), so collectives keep equal splits
(see `compactfusion_xdit.residual` for the RAW/SEED/CODED rules). A CODED message whose flag
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
from compactfusion_xdit.residual import FLAG_RAW_FOLLOWS, MessageKind, ResidualState, fallback_follows, path_of

#: Side messages (raw fallbacks) use the caller's tag plus this, so they never match a payload.
FALLBACK_TAG_OFFSET = 1 << 20


def link_key(key: Hashable, *ends: Hashable) -> tuple:
    """The channel key of one link: the caller's key (a tuple) extended with its ends."""
    if not isinstance(key, tuple):
        raise ValueError(f"channel key must be a tuple starting with a path name, got {key!r}")
    return (*key, *ends)


def finite_rows(x2: torch.Tensor) -> list[bool]:
    """`residual.is_finite` per row of a 2-D tensor, with one host sync."""
    return torch.isfinite(x2.sum(dim=1, dtype=torch.float32)).tolist()


class CompressedCommunicator:
    """Compressed all-to-all, all-gather, ring exchange and point-to-point over a process group.

    `group` is the default process group of every call (None: the world); each call may pass
    another. Wire buffers are reused per (key, role), so a key must not be in flight twice.
    """

    def __init__(self, state: ResidualState, group: dist.ProcessGroup | None = None) -> None:
        self.state = state
        self.group = group
        self._buffers: dict[tuple, torch.Tensor] = {}

    # ----- helpers ------------------------------------------------------------------------------
    def _group(self, group: dist.ProcessGroup | None) -> dist.ProcessGroup:
        if group is not None:
            return group
        return self.group if self.group is not None else dist.group.WORLD

    @staticmethod
    def _ranks(group: dist.ProcessGroup) -> tuple[list[int], int]:
        """Global ranks of the group (index = group rank) and this process's group rank."""
        return dist.get_process_group_ranks(group), dist.get_rank(group)

    def _buffer(self, key: Hashable, role: str, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        slot = (key, role)
        buf = self._buffers.get(slot)
        if buf is None or tuple(buf.shape) != tuple(shape) or buf.device != device:
            buf = self._buffers[slot] = torch.empty(shape, dtype=torch.uint8, device=device)
        return buf

    def release_buffers(self) -> None:
        """Free the pooled wire buffers (they are rebuilt on demand)."""
        self._buffers.clear()

    # ----- all-to-all -----------------------------------------------------------------------------
    def all_to_all(self, key: Hashable, x: torch.Tensor, group: dist.ProcessGroup | None = None,
                   async_op: bool = False) -> torch.Tensor | Pending:
        """Like ``dist.all_to_all_single(out, x, group=group)`` with equal splits: chunk d of x
        (dim 0 split into world-size chunks) goes to group rank d; the result holds the chunk from
        each rank in rank order. With ``async_op`` returns a `Pending` whose ``wait()`` gives it.

            y = comm.all_to_all(("ulysses", 3, "qkv"), x)
        """
        g = self._group(group)
        ranks, me = self._ranks(g)
        world = len(ranks)
        if x.dim() == 0 or x.shape[0] % world:
            raise ValueError(f"all_to_all needs dim 0 divisible by the group size {world}, got shape {tuple(x.shape)}")
        x = x.contiguous()
        chunk_shape = (x.shape[0] // world, *x.shape[1:])
        chunk_nbytes = x.numel() // world * x.element_size()
        path = path_of(key)
        state = self.state
        kind = state.message_kind(key, chunk_shape, x.dtype)
        out = torch.empty_like(x)
        chunks = x.view(world, *chunk_shape)
        out_chunks = out.view(world, *chunk_shape)
        if kind is not MessageKind.CODED:
            work = dist.all_to_all_single(out, x, group=g, async_op=True)
            state.record(path, kind, (world - 1) * chunk_nbytes, (world - 1) * chunk_nbytes, world - 1)

            def finish_raw() -> torch.Tensor:
                if kind is MessageKind.SEED:
                    sent_ok, got_ok = finite_rows(x.view(world, -1)), finite_rows(out.view(world, -1))
                    for peer in range(world):
                        if peer != me:
                            state.seed_sender(link_key(key, ranks[me], ranks[peer]), chunks[peer], sent_ok[peer])
                            state.seed_receiver(link_key(key, ranks[peer], ranks[me]), out_chunks[peer], got_ok[peer])
                return out

            pending = Pending([work], finish_raw, keep=x)
            return pending if async_op else pending.wait()

        n = state.wire_nbytes(chunk_shape, x.dtype, key)
        send = self._buffer(key, "a2a-send", (world, n), x.device)
        recv = self._buffer(key, "a2a-recv", (world, n), x.device)
        ok = finite_rows(x.view(world, -1))
        peers = [p for p in range(world) if p != me]
        sent_msgs = state.encode_many([link_key(key, ranks[me], ranks[p]) for p in peers], [chunks[p] for p in peers],
                                      [send[p] for p in peers], [ok[p] for p in peers])
        fallback_to = [p for p, msg in zip(peers, sent_msgs) if msg.fallback is not None]
        send[me].zero_()  # never read; keeps the bytes on the wire deterministic
        state.record(path, kind, (world - 1) * chunk_nbytes, (world - 1) * n + len(fallback_to) * chunk_nbytes, world - 1)
        work = dist.all_to_all_single(recv, send, group=g, async_op=True)

        def finish_coded() -> torch.Tensor:
            out_chunks[me].copy_(chunks[me])
            flags = recv[:, -1].tolist()
            fallback_from = [s for s in range(world) if s != me and flags[s] == FLAG_RAW_FOLLOWS]
            sent, received = p2p.post(g, [(chunks[d], ranks[d], FALLBACK_TAG_OFFSET) for d in fallback_to],
                                      [(out_chunks[s], ranks[s], FALLBACK_TAG_OFFSET) for s in fallback_from])
            received.wait()
            sent.wait()
            state.decode_many([link_key(key, ranks[s], ranks[me]) for s in peers], [recv[s] for s in peers],
                              chunk_shape, x.dtype, [out_chunks[s] for s in peers],
                              [out_chunks[s] if s in fallback_from else None for s in peers])
            return out

        pending = Pending([work], finish_coded, keep=(x, send, recv))
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
        send = self._buffer(key, "ag-send", (n,), x.device)
        recv = self._buffer(key, "ag-recv", (world, n), x.device)
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
        from compactfusion_xdit.comm.ring import RingExchange

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
