"""Residual channels: per-key sender and receiver caches, warm-up, error feedback, stats.

A channel is identified by a hashable key whose first element is the path name
(`config.PATHS`), e.g. ``("ulysses", layer, "k", src_rank, dst_rank)``. For every key a process
may hold a *sender* cache (what it believes the receiver holds) and a *receiver* cache (what it
reconstructed). With error feedback on, both are updated with the same arithmetic
(`Codec.encode_residual` / `Codec.decode_residual`), so they stay bitwise equal.

Message protocol (the rules sender and receiver evaluate identically, so collectives keep fixed
sizes and need no extra round of agreement):

1. `message_kind(key, shape, dtype)` depends only on the key's path, the step, the dtype and the
   numel, all of which both sides know:
   - ``RAW``: the raw tensor is the message. Compression off, path not enabled, a dtype the codecs
     do not code (anything but fp16/bf16/fp32, e.g. FP8 or integers), an empty tensor, or a
     warm-up step in plain mode.
   - ``SEED``: a warm-up step (``step < warmup``) in residual mode. The raw tensor is the message
     and both sides copy it into their cache (`seed_sender` / `seed_receiver`); a non-finite tensor
     is not cached (both sides see the same bits, so both drop the key).
   - ``CODED``: the message is ``payload bytes + 1 flag byte``, ``wire_nbytes(shape, dtype, key)`` long.

   With a schedule (`config.CompressionConfig.schedule`) the mode and codec of a message come from
   its key's path and layer (`schedule.layer_of`) and the step, so both sides pick the same codec.
   A message the schedule sends raw (``none``) is SEED when the same key's next step is coded in
   residual mode, so the residual then starts from a fresh cache; RAW otherwise. Caches hold
   reconstructions, not payloads, so a residual key may change codec from one step to the next.
2. In a CODED message the flag is ``FLAG_PAYLOAD`` (the payload codes the residual against the
   cache both sides hold, or x itself in plain mode) or ``FLAG_RAW_FOLLOWS``: the payload bytes
   are zero and the raw tensor follows in a point-to-point side message from this sender to this
   receiver. The sender raises it when its cache for the key is missing or was built for another
   shape/dtype (new key, after `reset`, after a shape change: both sides then re-seed from the raw
   tensor), or when x holds NaN/Inf (nothing is cached; the next message re-seeds). Only the
   sender knows, and the receiver learns it from the flag, so no global agreement is needed.

Lifecycle: `begin_request()` drops every cache and sets step 0; `set_step(i)` before each
denoising step; `reset(key)` drops one key (both sides).

    state = ResidualState(CompressionConfig.parse("residual-int4"))
    state.begin_request(); state.set_step(0)
    # sender                                   # receiver
    out = state.encode(key, x)                 y = state.decode(key, out.wire, x.shape, x.dtype,
                                                                fallback=out.fallback)
"""

from __future__ import annotations

import enum
import hashlib
import math
from dataclasses import dataclass
from typing import Any, Hashable

import torch

from compactfusion_xdit.core.config import PATHS, CompressionConfig
from compactfusion_xdit.core.schedule import layer_of

#: dtypes the codecs code; every other dtype travels raw.
CODED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
FLAG_PAYLOAD = 0
FLAG_RAW_FOLLOWS = 1
HEADER_NBYTES = 1


class MessageKind(enum.Enum):
    RAW = "raw"
    SEED = "seed"
    CODED = "coded"


@dataclass
class Outgoing:
    """An encoded message: `wire` (uint8 1-D, fixed size) and, when its flag says so, the raw
    tensor to deliver point-to-point to the same receiver after it (`fallback`, else None)."""

    wire: torch.Tensor
    fallback: torch.Tensor | None = None


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


def fallback_follows(wire: torch.Tensor) -> bool:
    """True when a CODED message says its raw tensor follows point-to-point."""
    return int(wire[-1]) == FLAG_RAW_FOLLOWS


def is_finite(x: torch.Tensor) -> bool:
    """False if x holds NaN or Inf. One float32 sum instead of an elementwise test (several times
    cheaper on a GPU): NaN/Inf always make the sum non-finite; a finite x whose sum overflows float32
    (|sum| > 3e38, not seen in activations) is reported non-finite too, which only costs a raw send."""
    return bool(torch.isfinite(x.sum(dtype=torch.float32)))


def _digest(t: torch.Tensor) -> str:
    h = hashlib.blake2b(digest_size=8)
    h.update(f"{tuple(t.shape)}{t.dtype}".encode())
    h.update(t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _new_path_stats() -> dict[str, int]:
    return dict(messages=0, raw_bytes=0, sent_bytes=0, raw_messages=0, coded_messages=0,
                nonfinite_fallbacks=0, reseed_fallbacks=0)


class ResidualState:
    """Everything a process keeps across steps: config, step, caches, stats. No globals.

    `encode`/`decode` are the two halves of a channel; the communicator (`compactfusion_xdit.comm`)
    moves the bytes and calls `record` for the traffic it puts on the wire.
    """

    def __init__(self, config: CompressionConfig | str | None = None) -> None:
        self.config = CompressionConfig.parse(config)
        self._codecs: dict[str, Any] = {}
        self.codec = self._codec(self.config.codec) if self.config.mode != "none" else None  # the default codec
        # (path, layer, step) -> (mode, codec); the schedule's choices, memoised per request
        self._choices: dict[tuple, tuple[str, Any]] = {}
        self.step = 0
        # key -> (cache tensor (2-D, x's dtype), original shape)
        self._send: dict[Hashable, tuple[torch.Tensor, tuple[int, ...]]] = {}
        self._recv: dict[Hashable, tuple[torch.Tensor, tuple[int, ...]]] = {}
        self._stats: dict[str, dict[str, int]] = {}
        self._wire_sizes: dict[tuple, int] = {}

    # ----- lifecycle -------------------------------------------------------------------------
    def begin_request(self) -> None:
        """Start a new request: drop every cache, step 0. Stats keep accumulating."""
        self._send.clear()
        self._recv.clear()
        self._choices.clear()
        self.step = 0

    def set_step(self, step: int) -> None:
        """Set the denoising step index within the current request (0-based)."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an integer >= 0, got {step!r}")
        self.step = step

    def reset(self, key: Hashable | None = None) -> None:
        """Drop the caches of `key` (both sides), or of every key when None."""
        if key is None:
            self._send.clear()
            self._recv.clear()
        else:
            self._send.pop(key, None)
            self._recv.pop(key, None)

    def reset_stats(self) -> None:
        self._stats.clear()

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
            chosen = self._choices[slot] = (mode, None if mode == "none" else self._codec(codec))
        return chosen

    def message_kind(self, key: Hashable, shape: tuple[int, ...], dtype: torch.dtype) -> MessageKind:
        """RAW, SEED or CODED for a message of this key at the current step (same on both sides)."""
        if not self.config.compresses(path_of(key)) or dtype not in CODED_DTYPES or math.prod(shape) == 0:
            return MessageKind.RAW
        mode = self.choice(key)[0]
        if mode == "none":  # scheduled raw: seed when the next step codes a residual
            return MessageKind.SEED if self.choice(key, self.step + 1)[0] == "residual" else MessageKind.RAW
        if self.step < self.config.warmup:
            return MessageKind.SEED if mode == "residual" else MessageKind.RAW
        return MessageKind.CODED

    def wire_nbytes(self, shape: tuple[int, ...], dtype: torch.dtype, key: Hashable | None = None) -> int:
        """Size of a CODED message of `key` at the current step (None: the default codec's):
        the codec payload plus the flag byte."""
        codec = self.codec if key is None else self.choice(key)[1]
        if codec is None:
            raise ValueError(f"no codec codes {key!r} at step {self.step}: its messages are not CODED")
        spec = (codec.name, tuple(shape), dtype)
        n = self._wire_sizes.get(spec)
        if n is None:
            n = self._wire_sizes[spec] = codec.payload_nbytes(shape_2d(shape), dtype) + HEADER_NBYTES
        return n

    def seed_sender(self, key: Hashable, x: torch.Tensor, finite: bool | None = None) -> bool:
        """SEED step, sender side: cache x (unless non-finite). Returns whether it was cached."""
        return self._seed(self._send, key, x, finite)

    def seed_receiver(self, key: Hashable, y: torch.Tensor, finite: bool | None = None) -> bool:
        """SEED step, receiver side: cache the raw tensor received (unless non-finite)."""
        return self._seed(self._recv, key, y, finite)

    def encode(self, key: Hashable, x: torch.Tensor, out: torch.Tensor | None = None,
               finite: bool | None = None) -> Outgoing:
        """CODED step, sender side: the wire message for x (written into `out` if given).

        `finite` may carry a precomputed ``isfinite(x).all()`` (one host sync for several chunks).
        """
        return self._encode(key, x, out, finite)

    def _encode(self, key: Hashable, x: torch.Tensor, out: torch.Tensor | None, finite: bool | None) -> Outgoing:
        mode, codec = self.choice(key)
        n = self.wire_nbytes(tuple(x.shape), x.dtype, key)
        wire = torch.empty(n, dtype=torch.uint8, device=x.device) if out is None else out
        if wire.dtype != torch.uint8 or wire.numel() != n:
            raise ValueError(f"out must be a uint8 tensor of {n} bytes, got {wire.dtype} with {wire.numel()} elements")
        path_stats = self._path_stats(path_of(key))
        x2 = as_2d(x)
        if finite is None:
            finite = is_finite(x2)
        if not finite:
            self._send.pop(key, None)
            path_stats["nonfinite_fallbacks"] += 1
            return self._raw_follows(wire, x)
        if mode == "plain":
            payload = codec.encode(x2)
        else:
            base = self._cache(self._send, key, x)
            if base is None:
                self._store(self._send, key, x)
                path_stats["reseed_fallbacks"] += 1
                return self._raw_follows(wire, x)
            payload = codec.encode_residual(x2, base, error_feedback=self.config.error_feedback)
        offset = 0
        for t in payload.tensors:
            b = t.contiguous().view(-1).view(torch.uint8)
            wire[offset:offset + b.numel()].copy_(b)
            offset += b.numel()
        if offset != n - HEADER_NBYTES:
            raise RuntimeError(f"codec {codec.name!r} wrote {offset} payload bytes, payload_nbytes says {n - HEADER_NBYTES}")
        wire[n - 1:].fill_(FLAG_PAYLOAD)
        return Outgoing(wire)

    def decode(self, key: Hashable, wire: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype,
               fallback: torch.Tensor | None = None, out: torch.Tensor | None = None,
               raw_follows: bool | None = None) -> torch.Tensor:
        """CODED step, receiver side: the tensor (shape, dtype) a wire message stands for.

        If `fallback_follows(wire)`, pass the raw tensor received point-to-point as `fallback`.
        `raw_follows` may carry that flag when the caller already read it (saves a host sync).
        The result is a fresh tensor (or `out`), never the cache itself.
        """
        return self._decode(key, wire, tuple(shape), dtype, fallback, out, raw_follows)

    def _decode(self, key: Hashable, wire: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype,
                fallback: torch.Tensor | None, out: torch.Tensor | None, raw_follows: bool | None) -> torch.Tensor:
        mode, codec = self.choice(key)
        fresh = False  # y2 is a new tensor nobody else holds
        if raw_follows is None:
            raw_follows = fallback_follows(wire)
        if raw_follows:
            if fallback is None:
                raise ValueError(f"message for {key!r} says its raw tensor follows: receive it and pass fallback=")
            if tuple(fallback.shape) != shape or fallback.dtype != dtype:
                raise ValueError(f"fallback for {key!r} is {tuple(fallback.shape)} {fallback.dtype}, expected {shape} {dtype}")
            if mode == "residual":
                if is_finite(fallback):
                    self._store(self._recv, key, fallback)
                else:
                    self._recv.pop(key, None)
            y2 = as_2d(fallback)
        else:
            s2 = shape_2d(shape)
            payload = codec.unflatten(wire[:-HEADER_NBYTES], s2, dtype)
            if mode == "plain":
                y2, fresh = codec.decode(payload), True
            else:
                entry = self._recv.get(key)
                if entry is None or entry[1] != shape or entry[0].dtype != dtype:
                    have = "no cache" if entry is None else f"a cache of {entry[1]} {entry[0].dtype}"
                    raise RuntimeError(
                        f"residual channel {key!r} out of sync: a payload arrived for {shape} {dtype} but the "
                        f"receiver has {have} (sender and receiver must see the same steps and resets)")
                codec.decode_residual(payload, entry[0])
                y2 = entry[0]
        if out is not None:
            if out.data_ptr() != y2.data_ptr():  # a fallback received straight into `out` is already there
                out.view(shape_2d(shape)).copy_(y2)
            return out
        return y2.reshape(shape) if fresh else y2.reshape(shape).clone()

    def encode_many(self, keys: list, xs: list[torch.Tensor], outs: list[torch.Tensor],
                    finite: list[bool]) -> list[Outgoing]:
        """`encode` for several keys at once: xs[i] (all of one shape and dtype) goes to keys[i], its
        wire message into outs[i]. The messages and caches equal those of one `encode` per key; a
        codec whose rows code independently (int8/int4/int2) codes the whole stack in one call."""
        batch = self._batch_codec(keys)
        if batch is not None and all(finite):
            mode, codec = batch
            x2 = torch.cat([as_2d(x) for x in xs])
            if mode == "plain":
                self._write_rows(codec.encode(x2), outs)
                return [Outgoing(w) for w in outs]
            bases = [self._cache(self._send, k, xs[0]) for k in keys]
            if all(b is not None for b in bases):
                base = torch.cat(bases)
                payload = codec.encode_residual(x2, base, error_feedback=self.config.error_feedback)
                for b, part in zip(bases, base.chunk(len(keys))):
                    b.copy_(part)
                self._write_rows(payload, outs)
                return [Outgoing(w) for w in outs]
        return [self._encode(k, x, w, f) for k, x, w, f in zip(keys, xs, outs, finite)]

    def decode_many(self, keys: list, wires: list[torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype,
                    outs: list[torch.Tensor], fallbacks: list[torch.Tensor | None] | None = None) -> list[torch.Tensor]:
        """`decode` for several keys at once: wires[i] came on keys[i] and is decoded into outs[i]
        (`fallbacks[i]`: the raw tensor when that message said it follows). The results and caches
        equal those of one `decode` per key; row-independent codecs decode the stack in one call."""
        shape = tuple(shape)
        fallbacks = fallbacks or [None] * len(keys)
        batch = self._batch_codec(keys)
        if batch is not None and all(f is None for f in fallbacks):
            mode, codec = batch
            entries = [self._recv.get(k) for k in keys]
            if mode == "plain" or all(e is not None and e[1] == shape and e[0].dtype == dtype for e in entries):
                payload = self._read_rows(codec, wires, shape_2d(shape), dtype)
                if mode == "plain":
                    y = codec.decode(payload)
                else:
                    y = torch.cat([e[0] for e in entries])
                    codec.decode_residual(payload, y)
                for i, part in enumerate(y.chunk(len(keys))):
                    if mode == "residual":
                        entries[i][0].copy_(part)
                    outs[i].view(part.shape).copy_(part)
                return outs
        return [self._decode(k, w, shape, dtype, f, o, f is not None) for k, w, o, f in zip(keys, wires, outs, fallbacks)]

    # ----- stats and checks -------------------------------------------------------------------
    def record(self, path: str, kind: MessageKind, raw_bytes: int, sent_bytes: int, messages: int = 1) -> None:
        """Count traffic this process put on the wire (called by the communicator)."""
        s = self._path_stats(path)
        s["messages"] += messages
        s["raw_bytes"] += raw_bytes
        s["sent_bytes"] += sent_bytes
        s["coded_messages" if kind is MessageKind.CODED else "raw_messages"] += messages

    def stats(self) -> dict[str, Any]:
        """Totals and per-path counts: bytes an uncompressed exchange would send (`raw_bytes`),
        bytes sent (`sent_bytes`, flag bytes and fallbacks included), messages, raw fallbacks,
        and the caches held (entries, bytes)."""
        paths = {p: dict(s) for p, s in self._stats.items()}
        total = {k: sum(s[k] for s in paths.values()) for k in _new_path_stats()}
        caches = [t for t, _ in self._send.values()] + [t for t, _ in self._recv.values()]
        return {
            "compression": self.config.name,
            **total,
            "ratio": total["raw_bytes"] / total["sent_bytes"] if total["sent_bytes"] else 1.0,
            "raw_fallbacks": total["nonfinite_fallbacks"] + total["reseed_fallbacks"],
            "cache_entries": len(caches),
            "cache_bytes": sum(t.numel() * t.element_size() for t in caches),
            "paths": paths,
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
        """The cache of one side ("send" or "recv") of a key, as a 2-D tensor (read-only use)."""
        entry = {"send": self._send, "recv": self._recv}[side].get(key)
        return None if entry is None else entry[0]

    # ----- internals --------------------------------------------------------------------------
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
    def _cache(side: dict, key: Hashable, x: torch.Tensor) -> torch.Tensor | None:
        entry = side.get(key)
        if entry is None:
            return None
        if entry[1] != tuple(x.shape) or entry[0].dtype != x.dtype or entry[0].device != x.device:
            del side[key]  # shape/dtype changed: this key starts over
            return None
        return entry[0]

    @staticmethod
    def _store(side: dict, key: Hashable, x: torch.Tensor) -> None:
        entry = side.get(key)
        if entry is not None and entry[1] == tuple(x.shape) and entry[0].dtype == x.dtype and entry[0].device == x.device:
            entry[0].copy_(as_2d(x))
        else:
            side[key] = (as_2d(x).clone(), tuple(x.shape))

    def _seed(self, side: dict, key: Hashable, x: torch.Tensor, finite: bool | None) -> bool:
        if finite is None:
            finite = is_finite(x)
        if not finite:
            side.pop(key, None)
            return False
        self._store(side, key, x)
        return True

    def _batch_codec(self, keys: list) -> tuple[str, Any] | None:
        """(mode, codec) when the messages of `keys` can be coded as one stack, else None."""
        if len(keys) < 2:
            return None
        chosen = self.choice(keys[0])
        if not getattr(chosen[1], "rows_independent", False) or any(self.choice(k) != chosen for k in keys[1:]):
            return None
        return chosen

    @staticmethod
    def _write_rows(payload, outs: list[torch.Tensor]) -> None:
        """Split a stacked payload into one wire message per stacked tensor (rows in equal parts)."""
        offset = 0
        for t in payload.tensors:
            per_message = t.reshape(len(outs), -1).view(torch.uint8)
            width = per_message.shape[1]
            for wire, row in zip(outs, per_message):
                wire[offset:offset + width].copy_(row)
            offset += width
        for wire in outs:
            if offset != wire.numel() - HEADER_NBYTES:
                raise RuntimeError(f"codec {payload.codec!r} wrote {offset} payload bytes per message, "
                                   f"the wire holds {wire.numel() - HEADER_NBYTES}")
            wire[-1:].fill_(FLAG_PAYLOAD)

    @staticmethod
    def _read_rows(codec, wires: list[torch.Tensor], shape2: tuple[int, int], dtype: torch.dtype):
        """The stacked payload of several wire messages, each for a tensor of 2-D shape `shape2`."""
        from compactfusion_xdit.codecs.payload import Payload

        parts, offset, count = [], 0, len(wires)
        for s, d in codec.layout(shape2, dtype):
            size = math.prod(s) * d.itemsize
            block = torch.stack([w[offset:offset + size] for w in wires])
            parts.append(block.view(d).reshape((count * s[0], *s[1:])))
            offset += size
        return Payload(tensors=tuple(parts), shape=(count * shape2[0], shape2[1]), dtype=dtype, codec=codec.name)

    @staticmethod
    def _raw_follows(wire: torch.Tensor, x: torch.Tensor) -> Outgoing:
        wire.zero_()
        wire[-1:].fill_(FLAG_RAW_FOLLOWS)
        return Outgoing(wire, fallback=x)
