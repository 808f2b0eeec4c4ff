"""Per-message cache history: the strongest form of the cache-consistency check.

`CacheHistory(state)` records, after every message a `ResidualState` codes or decodes (and every
warm-up seed), the step and a checksum of that key's cache on that side. Sender and receiver of a
link process the same messages in the same order, so their checksum sequences must be identical,
message by message (the steps only label the report). With error feedback off the sender caches x,
so only receivers are compared.
Comparing the sequences after a request (`mismatches`, a collective) checks every step of every
path without any collective during the request, so it also covers pipelined stages (PipeFusion),
where a collective at one stage's step boundary would wait for a stage that is waiting for it,
and exchanges still in flight at a step boundary (displaced patch parallelism).

    history = CacheHistory(state)          # observes every cache update of `state`
    ... run a request ...
    problems = history.mismatches()        # [] when every receiver tracked its sender bitwise
"""

from __future__ import annotations

import hashlib
from typing import Any, Hashable

import torch
import torch.distributed as dist

_NO_CACHE = "-"


def _checksum(t: torch.Tensor | None) -> str:
    if t is None:
        return _NO_CACHE
    h = hashlib.blake2b(digest_size=8)
    h.update(t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class CacheHistory:
    """Records ``(step, checksum)`` per (side, key) after each update of `state`'s caches."""

    def __init__(self, state: Any) -> None:
        self.state = state
        self.entries: dict[tuple[str, Hashable], list[tuple[int, str]]] = {}
        state.observer = self.record

    def record(self, side: str, key: Hashable) -> None:
        if side == "send" and not self.state.config.error_feedback:
            return  # the sender caches x, not the reconstruction
        self.entries.setdefault((side, key), []).append((self.state.step, _checksum(self.state.cache(side, key))))

    def clear(self) -> None:
        self.entries.clear()

    def detach(self) -> None:
        """Stop recording."""
        if self.state.observer == self.record:
            self.state.observer = None

    def mismatches(self, group: dist.ProcessGroup | None = None) -> list[str]:
        """Collective over `group` (default: the world; it must hold both ends of every link): one
        line per key whose sender and receiver histories differ, naming the first differing step."""
        if dist.is_initialized():
            gathered: list = [None] * dist.get_world_size(group)
            dist.all_gather_object(gathered, self.entries, group=group)
        else:
            gathered = [self.entries]
        by_key: dict[Hashable, list[tuple[int, str, list]]] = {}
        for rank, entries in enumerate(gathered):
            for (side, key), seq in entries.items():
                by_key.setdefault(key, []).append((rank, side, seq))
        both_sides = self.state.config.error_feedback
        return [line for key, seqs in by_key.items() if (line := _compare(key, seqs, both_sides))]


def _compare(key: Hashable, seqs: list[tuple[int, str, list]], both_sides: bool) -> str | None:
    sides = {side for _, side, _ in seqs}
    if both_sides and len(sides) == 1:
        side = seqs[0][1]
        ranks = ", ".join(str(r) for r, _, _ in seqs)
        return (f"{key!r}: only a {side} side (rank {ranks}): its messages were never "
                + ("received" if side == "send" else "sent"))
    # Checksums are compared in message order; the steps only label the report (a PipeFusion stage
    # may decode message k while its own loop is at another step).
    reference = [c for _, c in seqs[0][2]]
    if all([c for _, c in seq] == reference for _, _, seq in seqs[1:]):
        return None
    longest = max(len(seq) for _, _, seq in seqs)
    for i in range(longest):
        column = {(rank, side): (seq[i] if i < len(seq) else None) for rank, side, seq in seqs}
        if len({e[1] if e else None for e in column.values()}) > 1:
            shown = ", ".join(f"rank {r} {s} " + (f"step {e[0]} {e[1]}" if e else "(no message)")
                              for (r, s), e in column.items())
            return f"{key!r}: message {i} differs: {shown}"
    return None
