"""Residual channels: per-key sender and receiver caches, warm-up, error feedback, stats.

A channel is identified by a hashable key whose first element is the path name
(`config.PATHS`), e.g. ``("ulysses", layer, "k", src_rank, dst_rank)``. For every key a process
may hold a *sender* cache (what it believes the receiver holds) and a *receiver* cache (what it
reconstructed). With error feedback on, both are updated with the same arithmetic
(`Codec.encode_residual` / `Codec.decode_residual`), so they stay bitwise equal.

Message protocol (the rules sender and receiver evaluate identically from the state they mirror,
so collectives keep fixed sizes, need no extra round of agreement and no side messages):

1. `message_kind(key, shape, dtype, link, side)` depends on the key's path, the step, the dtype,
   the numel and, in residual mode, on whether the link's cache exists:
   - ``RAW``: the raw tensor is the message. Compression off, path not enabled, a dtype the codecs
     do not code (anything but fp16/bf16/fp32, e.g. FP8 or integers), an empty tensor, or a
     warm-up step in plain mode.
   - ``SEED``: the raw tensor is the message and both sides copy it into their cache
     (`seed_sender` / `seed_receiver`; rows holding NaN/Inf are cached as zeros, on both sides from
     the same bits). In residual mode: a warm-up step (``step < warmup``), or a coded step whose
     link has no cache of this shape and dtype (new key, after `begin_request`/`reset`, after a
     shape change). Caches are created and dropped in step on both ends, so both decide alike.
   - ``CODED``: the message is the codec payload, ``wire_nbytes(shape, dtype, key)`` bytes.

   With a schedule (`config.CompressionConfig.schedule`) the mode and codec of a message come from
   its key's path and layer (`schedule.layer_of`) and the step, so both sides pick the same codec.
   A message the schedule sends raw (``none``) is SEED when the same key's next step is coded in
   residual mode, so the residual then starts from a fresh cache; RAW otherwise. Caches hold
   reconstructions, not payloads, so a residual key may change codec from one step to the next.
2. NaN/Inf travel in band: a row of x holding one is coded as a zero residual (its cache row keeps
   its value on both ends) and its per-row scale is sent as NaN (`Codec.encode_block`); the
   receiver's output has NaN in that row. NaN/Inf never enter a cache and the next step is clean.

Lifecycle: `begin_request()` drops every cache and sets step 0; `set_step(i)` before each
denoising step; `reset(key)` drops one link's caches (both ends must do it).

    state = ResidualState(CompressionConfig.parse("residual-int4"))
    state.begin_request(); state.set_step(1)                  # past warm-up (warmup=1)
    # sender                                   # receiver
    if state.message_kind(key, x.shape, x.dtype, link, "send") is MessageKind.SEED:
        state.seed_sender(link, x)             state.seed_receiver(link, y_raw)
    else:
        wire = state.encode(link, x)           y = state.decode(link, wire, x.shape, x.dtype)
"""

from __future__ import annotations

import enum
import hashlib
import math
from typing import Any, Callable, Hashable

import torch

from compactfusion_xdit.core.config import AUTO, PATHS, CompressionConfig
from compactfusion_xdit.core.schedule import layer_of
from compactfusion_xdit.core.scope import LINK_CLASSES

#: dtypes the codecs code; every other dtype travels raw.
CODED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SIDES = ("send", "recv")


class MessageKind(enum.Enum):
    RAW = "raw"
    SEED = "seed"
    CODED = "coded"


def shape_2d(shape: torch.Size | tuple[int, ...]) -> tuple[int, int]:
    """The codec view of a tensor: (prod(leading dims), last dim); a scalar is (1, 1)."""
    if len(shape) == 0:
        return (1, 1)
    return (math.prod(shape[:-1]), shape[-1])


def as_2d(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(shape_2d(x.shape))


def path_of(key: Hashable) -> str:
    """The path a key belongs to: its first element, which must be one of `config.PATHS`."""
    path = key[0] if isinstance(key, tuple) and key else None
    if path not in PATHS:
        raise ValueError(f"channel key {key!r} must be a tuple starting with a path name, one of {', '.join(PATHS)}")
    return path


def finite_rows_zeroed(x2: torch.Tensor) -> torch.Tensor:
    """x2 (2-D) with every row that holds NaN/Inf set to zeros: what a SEED caches. Elementwise, so
    both ends get the same bits from the same tensor; no host sync."""
    return x2.masked_fill(~torch.isfinite(x2).all(dim=1, keepdim=True), 0)


def _digest(t: torch.Tensor) -> str:
    h = hashlib.blake2b(digest_size=8)
    h.update(f"{tuple(t.shape)}{t.dtype}".encode())
    h.update(t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _new_path_stats() -> dict[str, int]:
    return dict(messages=0, raw_bytes=0, sent_bytes=0, raw_messages=0, coded_messages=0, reseeds=0, nonfinite_rows=0)


class ResidualState:
    """Everything a process keeps across steps: config, step, caches, stats. No globals.

    `encode`/`decode` are the two halves of a channel; the communicator (`compactfusion_xdit.comm`)
    moves the bytes and calls `record` for the traffic it puts on the wire. A cache is a 2-D tensor
    per link and side; `stacked` lets a communicator keep the caches of one exchange as views of one
    stacked tensor.
    """

    def __init__(self, config: CompressionConfig | str | None = None) -> None:
        self.config = CompressionConfig.parse(config)
        self._codecs: dict[str, Any] = {}
        self.codec = self._codec(self.config.codec) if self.config.mode not in ("none", AUTO) else None  # the default codec
        # (path, layer, step) -> (mode, codec); the schedule's choices, memoised per request
        self._choices: dict[tuple, tuple[str, Any]] = {}
        self.step = 0
        # link key -> (cache tensor (2-D, x's dtype), original shape)
        self._send: dict[Hashable, tuple[torch.Tensor, tuple[int, ...]]] = {}
        self._recv: dict[Hashable, tuple[torch.Tensor, tuple[int, ...]]] = {}
        self._stats: dict[str, dict[str, int]] = {}
        self._nonfinite: dict[str, Any] = {}  # path -> rows sent NaN-marked (int or device tensor)
        self._wire_sizes: dict[tuple, int] = {}
        #: Called as ``observer(side, link)`` after every message that may have updated that cache
        #: (`cache_history.CacheHistory` records checksums with it); None: nobody listens.
        self.observer: Callable[[str, Hashable], None] | None = None
        #: Bumped whenever a cache entry is added, replaced or dropped (not when a cache's values
        #: change in place): a communicator may keep what it looked up while it is unchanged.
        self.generation = 0
        #: What the step rules depend on at the current step: the step itself under a schedule,
        #: else only whether it is a warm-up step (auto's decision changes `generation`). Message
        #: kinds and codec choices are the same at two steps of one regime (and one `generation`),
        #: so a communicator memoises them.
        self.regime: Any = True
        # --- auto (core/auto.py): the per-path decision, None unless the config names auto
        self.auto = None
        if AUTO in (self.config.mode, *(mode for mode, _ in self.config._rule_choices)):
            from compactfusion_xdit.core.auto import AutoSelector

            self.auto = AutoSelector(self.config)
        # --- end auto
        #: The hosts of the ranks (`core.scope.LinkScope`), set once at start by the session; None
        #: until then (every exchange of a compressed path may be coded, no intra/inter split).
        self.scope = None
        self._links: dict[str, dict[str, list[int]]] = {}  # path -> link class -> [raw, sent, messages]

    # ----- lifecycle -------------------------------------------------------------------------
    def begin_request(self, shape: Hashable = None) -> None:
        """Start a new request: drop every cache, step 0. Stats keep accumulating. `shape` (e.g.
        height, width, steps): in auto mode a change measures the links again."""
        if self.auto is not None:
            self.auto.begin_request(shape)
        self._send.clear()
        self._recv.clear()
        self._choices.clear()
        self.step = 0
        self.regime = self._regime(0)
        self.generation += 1

    def set_step(self, step: int) -> None:
        """Set the denoising step index within the current request (0-based)."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an integer >= 0, got {step!r}")
        self.step = step
        self.regime = self._regime(step)
        if self.auto is not None:
            self.auto.stepped(step)
            if step >= self.config.warmup:
                if self.auto.pending and not self.auto.between_requests:
                    self.auto.agree()  # a world collective: every rank reaches its first coded step alike
                    self._choices.clear()
                    self.generation += 1  # exchange plans memoise kinds per generation
                self.auto.coded_step()

    def reset(self, key: Hashable | None = None) -> None:
        """Drop the caches of link `key` (both sides), or of every link when None; the link's next
        message seeds again. Both ends of the link must reset it."""
        if key is None:
            self._send.clear()
            self._recv.clear()
        else:
            self._send.pop(key, None)
            self._recv.pop(key, None)
        self.generation += 1

    def reset_stats(self) -> None:
        self._stats.clear()
        self._nonfinite.clear()
        self._links.clear()

    # ----- protocol ----------------------------------------------------------------------------
    def choice(self, key: Hashable, step: int | None = None) -> tuple[str, Any]:
        """``(mode, codec object or None)`` for messages of `key` at `step` (default: the current one)."""
        path = path_of(key)
        layer = layer_of(key)
        step = self.step if step is None else step
        slot = (path, layer, step)
        chosen = self._choices.get(slot)
        if chosen is None:
            mode, codec = self.config.choice(path, layer, step)
            if mode == AUTO:
                mode, codec = self._auto_choice(path)
            chosen = self._choices[slot] = (mode, None if mode == "none" else self._codec(codec))
        return chosen

    def message_kind(self, key: Hashable, shape: tuple[int, ...], dtype: torch.dtype,
                     link: Hashable | None = None, side: str = "send", ranks=None) -> MessageKind:
        """RAW, SEED or CODED for a message of `key` at the current step (same on both ends).

        Give the `link` (and this end's `side`) of the message: a coded residual message becomes a
        SEED when that cache is missing (both ends hold or lack it together). Without a link only
        the step rules apply (a coded message then needs its caches in place). `ranks`: the global
        ranks of the exchange; outside the scope (`core.scope`, e.g. all on one host with scope
        inter-node) the message is RAW for good: never seeded, never cached."""
        if (not self.config.compresses(path_of(key)) or dtype not in CODED_DTYPES or math.prod(shape) == 0
                or (ranks is not None and self.scope is not None and not self.scope.codes(ranks))):
            return MessageKind.RAW
        mode = self.choice(key)[0]
        if mode == "none":  # scheduled raw: seed when the next step codes a residual
            return MessageKind.SEED if self.choice(key, self.step + 1)[0] == "residual" else MessageKind.RAW
        if self.step < self.config.warmup:
            return MessageKind.SEED if mode == "residual" else MessageKind.RAW
        if mode == "residual" and link is not None and not self.has_cache(side, link, shape, dtype):
            return MessageKind.SEED
        return MessageKind.CODED

    def is_reseed(self, key: Hashable, shape: tuple[int, ...], dtype: torch.dtype) -> bool:
        """Whether a SEED of `key` now is a re-seed: the step rules code it, a missing cache made it
        raw (not the warm-up, nor a schedule's raw step before a residual one)."""
        return self.message_kind(key, shape, dtype) is MessageKind.CODED

    def _auto_choice(self, path: str) -> tuple[str, str]:
        """(mode, codec name) auto gives `path`: the agreed name; before the decision (the warm-up
        being measured) the floor's, so a residual floor seeds the caches a later coded step needs,
        or ``none`` when the ranks agree between requests (nothing is coded before it)."""
        decision = self.auto.decision
        if decision is None:  # between requests the measured request is raw throughout
            name = "none" if self.auto.between_requests else self.auto.floor
        else:
            name = decision.get(path, "none")
        parsed = self.auto.parsed.get(name)
        if parsed is None:
            config = CompressionConfig.parse(name)
            parsed = self.auto.parsed[name] = (config.mode, config.codec)
        return parsed

    def auto_clock(self) -> float | None:
        """Start time of a RAW/SEED exchange to measure for auto (None: nothing is measured now)."""
        return None if self.auto is None else self.auto.clock(self.step)

    def auto_observe(self, path: str, nbytes: int, start: float, sample: torch.Tensor | None = None,
                     group: Any = None, link: tuple[int, int] | None = None, hidden: float = 0.0) -> None:
        """A measured exchange (`auto_clock` gave `start`) of `path` finished after `nbytes` were
        sent (received, for a point-to-point receive); `group`: the collective's process group, or
        `link`: the receive's (src, dst) global ranks, which auto probes once before deciding;
        `hidden`: the seconds between posting and the first wait (the caller's work alongside)."""
        if nbytes and path in self.config.paths:
            self.auto.observe(path, nbytes, start, sample, group, link, hidden)

    def auto_between_requests(self) -> None:
        """Agree on auto's decision at request starts, on what the previous request measured (it is
        sent raw), not at the first coded step: for layouts whose ranks are not in lock-step
        within a request (PipeFusion stages, step-parallel ranks). Every rank must call it alike,
        before its first request that exchanges anything. No-op without auto."""
        if self.auto is not None:
            self.auto.between_requests = True

    def has_cache(self, side: str, link: Hashable, shape: tuple[int, ...], dtype: torch.dtype) -> bool:
        """Whether `side` ("send"/"recv") holds a cache of `link` for tensors of this shape and dtype."""
        entry = self._side(side).get(link)
        return entry is not None and entry[1] == tuple(shape) and entry[0].dtype == dtype

    def has_caches(self, send_links, recv_links, shape: tuple[int, ...], dtype: torch.dtype) -> bool:
        """Whether this end holds the send caches of `send_links` and the receive caches of
        `recv_links` (a collective seeds its key when one is missing)."""
        return (all(self.has_cache("send", link, shape, dtype) for link in send_links)
                and all(self.has_cache("recv", link, shape, dtype) for link in recv_links))

    def wire_nbytes(self, shape: tuple[int, ...], dtype: torch.dtype, key: Hashable | None = None) -> int:
        """Size of a CODED message of `key` at the current step (None: the default codec's): the
        codec payload, nothing else."""
        codec = self.codec if key is None else self.choice(key)[1]
        if codec is None:
            raise ValueError(f"no codec codes {key!r} at step {self.step}: its messages are not CODED")
        spec = (codec.name, tuple(shape), dtype)
        n = self._wire_sizes.get(spec)
        if n is None:
            n = self._wire_sizes[spec] = codec.payload_nbytes(shape_2d(shape), dtype)
        return n

    def seed_sender(self, link: Hashable, x: torch.Tensor) -> None:
        """SEED, sender side: cache x (rows holding NaN/Inf as zeros)."""
        self._seed(self._send, link, x)
        self.touched("send", (link,))

    def seed_receiver(self, link: Hashable, y: torch.Tensor) -> None:
        """SEED, receiver side: cache the raw tensor received (rows holding NaN/Inf as zeros)."""
        self._seed(self._recv, link, y)
        self.touched("recv", (link,))

    def encode(self, link: Hashable, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """CODED, sender side: the wire message (uint8, `wire_nbytes` long; written into `out` if
        given) for x on `link`; in residual mode the link's send cache advances."""
        mode, codec = self.choice(link)
        n = self.wire_nbytes(tuple(x.shape), x.dtype, link)
        wire = torch.empty(n, dtype=torch.uint8, device=x.device) if out is None else out
        if wire.dtype != torch.uint8 or wire.numel() != n:
            raise ValueError(f"out must be a uint8 tensor of {n} bytes, got {wire.dtype} with {wire.numel()} elements")
        x2 = as_2d(x)
        base = self._require(self._send, link, x.shape, x.dtype, x.device) if mode == "residual" else None
        bad = codec.encode_block(x2.unsqueeze(0), None if base is None else base.unsqueeze(0), wire.view(1, n), 0,
                                 mode == "residual", self.config.error_feedback)
        self.count_nonfinite(path_of(link), bad)
        self.touched("send", (link,))
        return wire

    def decode(self, link: Hashable, wire: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype,
               out: torch.Tensor | None = None) -> torch.Tensor:
        """CODED, receiver side: the tensor (shape, dtype) a wire message of `link` stands for (in
        `out` if given, else a fresh tensor, never the cache itself); the receive cache advances."""
        mode, codec = self.choice(link)
        shape = tuple(shape)
        y = torch.empty(shape, dtype=dtype, device=wire.device) if out is None else out
        base = self._require(self._recv, link, shape, dtype, wire.device) if mode == "residual" else None
        y2 = as_2d(y)
        target = y2 if y2.is_contiguous() else torch.empty_like(y2)
        codec.decode_block(wire.view(1, -1), 0, None if base is None else base.unsqueeze(0), target.unsqueeze(0),
                           mode == "residual")
        if target is not y2:
            y2.copy_(target)
        self.touched("recv", (link,))
        return y

    def stacked(self, side: str, links: list, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
        """The caches of `links` (one side) as one (len(links), *shape_2d(shape)) tensor, or None
        when one is missing. Each cache becomes a view of it (adopted once; later calls find them
        in place and return the same tensor without copying)."""
        table = self._side(side)
        entries = [table.get(link) for link in links]
        if any(e is None or e[1] != tuple(shape) or e[0].dtype != dtype for e in entries):
            return None
        first = entries[0][0]
        stack = getattr(first, "_cfx_stack", None)
        if stack is not None and all(getattr(e[0], "_cfx_stack", None) is stack and getattr(e[0], "_cfx_index", -1) == i
                                     for i, e in enumerate(entries)) and stack.shape[0] == len(links):
            return stack
        stack = torch.stack([e[0] for e in entries])
        self._register(table, links, stack, shape)
        return stack

    def seed_stacked(self, side: str, links: list, values: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """SEED of several links at once: values (len(links), N, C) cached (NaN/Inf rows as zeros)
        as one stacked tensor whose slices are the links' caches. Returns the stack."""
        count = len(links)
        stack = finite_rows_zeroed(values.reshape(-1, values.shape[-1])).view(count, *shape_2d(shape))
        self._register(self._side(side), links, stack, shape)
        self.touched(side, links)
        return stack

    def touched(self, side: str, links) -> None:
        """Tell the observer that the `side` caches of `links` took a message (a communicator
        that codes a stacked exchange itself calls this)."""
        if self.observer is not None:
            for link in links:
                self.observer(side, link)

    def count_nonfinite(self, path: str, rows) -> None:
        """Add rows sent NaN-marked (an int or a device tensor: read only by `stats`)."""
        held = self._nonfinite.get(path, 0)
        if isinstance(held, torch.Tensor) and isinstance(rows, torch.Tensor) and held.device == rows.device:
            held.add_(rows)  # the path's device counter, in place: no new tensor per message
        elif isinstance(rows, torch.Tensor) or rows:
            self._nonfinite[path] = held + rows

    # ----- stats and checks -------------------------------------------------------------------
    def record(self, path: str, kind: MessageKind, raw_bytes: int, sent_bytes: int, messages: int = 1,
               reseeds: int = 0, peers=None) -> None:
        """Count traffic this process put on the wire (called by the communicator); `reseeds`: how
        many of the messages are SEEDs after the warm-up (a new or reset cache); `peers`: the global
        ranks the messages went to, one equal share each (split into intra- and inter-node bytes
        once the hosts are known)."""
        s = self._path_stats(path)
        s["messages"] += messages
        s["raw_bytes"] += raw_bytes
        s["sent_bytes"] += sent_bytes
        s["coded_messages" if kind is MessageKind.CODED else "raw_messages"] += messages
        s["reseeds"] += reseeds
        if peers and self.scope is not None:
            self._record_links(path, raw_bytes, sent_bytes, messages, peers)

    def _record_links(self, path: str, raw_bytes: int, sent_bytes: int, messages: int, peers) -> None:
        n = len(peers)
        by_class = self._links.setdefault(path, {})
        for link_class, count in zip(LINK_CLASSES, self.scope.split(peers)):
            if count:
                c = by_class.setdefault(link_class, [0, 0, 0])
                c[0] += raw_bytes * count // n
                c[1] += sent_bytes * count // n
                c[2] += messages * count // n

    def stats(self) -> dict[str, Any]:
        """Totals and per-path counts: bytes an uncompressed exchange would send (`raw_bytes`),
        bytes sent (`sent_bytes`), messages, SEEDs after warm-up (`reseeds`), rows sent marked
        non-finite (`nonfinite_rows`, read from the device here), and the caches held."""
        paths = {p: dict(s) for p, s in self._stats.items()}
        for p, rows in self._nonfinite.items():
            paths.setdefault(p, _new_path_stats())["nonfinite_rows"] = int(rows)
        total = {k: sum(s[k] for s in paths.values()) for k in _new_path_stats()}
        links = {}
        for p, by_class in self._links.items():  # known hosts: bytes per link class (core/scope.py)
            paths[p]["links"] = {c: dict(zip(("raw_bytes", "sent_bytes", "messages"), v)) for c, v in by_class.items()}
            for c, counts in paths[p]["links"].items():
                total_c = links.setdefault(c, dict.fromkeys(counts, 0))
                for k, v in counts.items():
                    total_c[k] += v
        caches = [t for t, _ in self._send.values()] + [t for t, _ in self._recv.values()]
        return {
            "compression": self.config.name,
            **total,
            "ratio": total["raw_bytes"] / total["sent_bytes"] if total["sent_bytes"] else 1.0,
            "cache_entries": len(caches),
            "cache_bytes": sum(t.numel() * t.element_size() for t in caches),
            "paths": paths,
            **({"auto": self.auto.stats()} if self.auto is not None else {}),
            **({"links": links} if self.scope is not None else {}),
        }

    def cache_digests(self) -> dict[tuple[str, Hashable], str]:
        """A checksum per cache: ``{("send"|"recv", key): hex}``. With error feedback on, every
        sender cache equals the receiver caches of the same key bitwise. With it off the sender
        caches x, not the reconstruction, so only receiver caches are listed."""
        out = {("recv", k): _digest(t) for k, (t, _) in self._recv.items()}
        if self.config.error_feedback:
            out.update({("send", k): _digest(t) for k, (t, _) in self._send.items()})
        return out

    def cache(self, side: str, key: Hashable) -> torch.Tensor | None:
        """The cache of one side ("send" or "recv") of a link, as a 2-D tensor (read-only use)."""
        entry = self._side(side).get(key)
        return None if entry is None else entry[0]

    # ----- internals --------------------------------------------------------------------------
    def _regime(self, step: int) -> Any:
        return step if self.config.schedule else step < self.config.warmup

    def _side(self, side: str) -> dict:
        if side == "send":
            return self._send
        if side == "recv":
            return self._recv
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")

    def _codec(self, name: str):
        codec = self._codecs.get(name)
        if codec is None:
            from compactfusion_xdit import codecs

            codec = self._codecs[name] = codecs.get(name)
        return codec

    def _path_stats(self, path: str) -> dict[str, int]:
        s = self._stats.get(path)
        if s is None:
            s = self._stats[path] = _new_path_stats()
        return s

    @staticmethod
    def _require(side: dict, link: Hashable, shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        entry = side.get(link)
        if entry is None or entry[1] != tuple(shape) or entry[0].dtype != dtype or entry[0].device != device:
            have = "no cache" if entry is None else f"a cache of {entry[1]} {entry[0].dtype} on {entry[0].device}"
            raise RuntimeError(
                f"residual channel {link!r} out of sync: a coded message for {tuple(shape)} {dtype} but this end has "
                f"{have} (ask message_kind with the link first; both ends must see the same steps and resets)")
        return entry[0]

    def _register(self, table: dict, links: list, stack: torch.Tensor, shape: tuple[int, ...]) -> None:
        self.generation += 1
        for i, link in enumerate(links):
            view = stack[i]
            view._cfx_stack, view._cfx_index = stack, i
            table[link] = (view, tuple(shape))

    def _seed(self, side: dict, link: Hashable, x: torch.Tensor) -> None:
        value = finite_rows_zeroed(as_2d(x))
        entry = side.get(link)
        if entry is not None and entry[1] == tuple(x.shape) and entry[0].dtype == x.dtype and entry[0].device == x.device:
            entry[0].copy_(value)
        else:
            side[link] = (value, tuple(x.shape))
            self.generation += 1
