"""Compression schedules: a codec per message chosen from its path, layer and denoising step.

    rules = parse_schedule("steps=0-1:none; layers=0-3:residual-int8; layers=4- paths=ulysses:residual-1bit")
    rules = parse_schedule([{"steps": "0-1", "codec": "none"}, {"layers": "4-", "codec": "residual-1bit"}])
    CompressionConfig.parse("residual-int4", schedule=rules)     # the default codec is residual-int4

A rule names a codec (any compression name: ``none``, ``int4``, ``residual-int4``, ...) and up to
three selectors; it matches a message when every selector it names matches:

    steps   denoising steps of the request, 0-based (PipeFusion: the channel's patch-phase message)
    layers  the layer index carried by the channel key (see `layer_of`); keys without one never match
    paths   communication paths (ulysses, ring, pipefusion, legacy, patch, step)

The first matching rule wins; a message no rule matches uses the config's default codec. Step and
layer sets are comma lists of ``N``, ``N-M`` (inclusive) and ``N-`` (N and above), as text or,
from YAML, an integer or a list. Text form of a schedule: rules separated by ``;``, each
``SELECTOR [SELECTOR ...]:CODEC`` with ``SELECTOR`` = ``steps=SET``, ``layers=SET`` or
``paths=a,b``; ``str(rule)`` writes it and `parse_schedule` reads it back.

This module checks the structure only; `compactfusion_xdit.core.config` checks codec and path names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Hashable, Iterable

#: Where the layer index sits in a channel key, per path (keys are built by the patches:
#: ``("ulysses", layer, role)``, ``("legacy", layer, role)``, ``("patch", layer, "k"|"v")``,
#: ``("ring", pipefusion_patch, layer)``). PipeFusion and step keys carry no layer.
LAYER_POSITION = {"ulysses": 1, "legacy": 1, "patch": 1, "ring": 2}
SELECTORS = ("steps", "layers", "paths")
RULE_KEYS = SELECTORS + ("codec",)


class ScheduleError(ValueError):
    """A schedule that cannot be read; the message names the rule and the fix."""


@dataclass(frozen=True)
class IndexSet:
    """A set of non-negative integers as inclusive ranges; ``hi`` None means no upper bound."""

    ranges: tuple[tuple[int, int | None], ...]

    def __contains__(self, index: int) -> bool:
        return any(lo <= index and (hi is None or index <= hi) for lo, hi in self.ranges)

    def edges(self) -> set[int]:
        """The indices where membership may change (each range's start and one past its end)."""
        out = set()
        for lo, hi in self.ranges:
            out.add(lo)
            if hi is not None:
                out.add(hi + 1)
        return out

    def __str__(self) -> str:
        return ",".join(str(lo) if hi == lo else f"{lo}-" if hi is None else f"{lo}-{hi}" for lo, hi in self.ranges)


def _index(text: str, what: str) -> int:
    text = text.strip()
    if not text.isdigit():
        raise ScheduleError(f"{what}: {text!r} is not an integer >= 0")
    return int(text)


def parse_index_set(value: Any, what: str = "set") -> IndexSet:
    """An `IndexSet` from ``3``, ``"0-2,5,7-"`` or ``[0, "4-6"]``."""
    items = value if isinstance(value, (list, tuple)) else [value]
    if not items:
        raise ScheduleError(f"{what}: empty; give e.g. 0-2, 5 or 4- (4 and above)")
    ranges = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (int, str)):
            raise ScheduleError(f"{what}: {item!r} is not an index or range such as 0-2, 5 or 4-")
        if isinstance(item, int):
            if item < 0:
                raise ScheduleError(f"{what}: {item} is negative; indices start at 0")
            ranges.append((item, item))
            continue
        for part in item.split(","):
            lo_text, dash, hi_text = part.strip().partition("-")
            if not part.strip():
                raise ScheduleError(f"{what}: empty item in {item!r}; give e.g. 0-2,5")
            lo = _index(lo_text, what)
            hi = None if dash and not hi_text.strip() else _index(hi_text, what) if dash else lo
            if hi is not None and hi < lo:
                raise ScheduleError(f"{what}: range {part.strip()!r} ends before it starts")
            ranges.append((lo, hi))
    return IndexSet(tuple(ranges))


@dataclass(frozen=True)
class ScheduleRule:
    """One rule: `codec` (a compression name) for the messages the selectors match (None: any)."""

    codec: str
    steps: IndexSet | None = None
    layers: IndexSet | None = None
    paths: tuple[str, ...] | None = None

    def matches(self, path: str, layer: int | None, step: int) -> bool:
        if self.paths is not None and path not in self.paths:
            return False
        if self.layers is not None and (layer is None or layer not in self.layers):
            return False
        return self.steps is None or step in self.steps

    def __str__(self) -> str:
        selectors = [f"steps={self.steps}" if self.steps else "", f"layers={self.layers}" if self.layers else "",
                     f"paths={','.join(self.paths)}" if self.paths else ""]
        return " ".join(s for s in selectors if s) + ":" + self.codec


def _paths(value: Any, what: str) -> tuple[str, ...]:
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(p, str) for p in items):
        raise ScheduleError(f"{what}: expected path names such as ulysses,ring, got {value!r}")
    paths = tuple(p.strip() for p in items if p.strip())
    if not paths:
        raise ScheduleError(f"{what}: empty; name at least one path")
    return paths


def _rule_from_mapping(value: dict, where: str) -> ScheduleRule:
    unknown = [k for k in value if k not in RULE_KEYS]
    if unknown:
        raise ScheduleError(f"{where}: unknown key {unknown[0]!r}; a rule has {', '.join(RULE_KEYS)}")
    codec = value.get("codec")
    if not isinstance(codec, str) or not codec.strip():
        raise ScheduleError(f"{where}: needs codec: a compression name such as none, residual-int4")
    return ScheduleRule(
        codec=codec.strip(),
        steps=parse_index_set(value["steps"], f"{where} steps") if "steps" in value else None,
        layers=parse_index_set(value["layers"], f"{where} layers") if "layers" in value else None,
        paths=_paths(value["paths"], f"{where} paths") if "paths" in value else None,
    )


def _rule_from_text(text: str, where: str) -> ScheduleRule:
    selectors, colon, codec = text.rpartition(":")
    if not colon or not codec.strip():
        raise ScheduleError(f"{where}: {text.strip()!r} has no ':CODEC'; write e.g. steps=0-1:none")
    fields: dict[str, Any] = {"codec": codec.strip()}
    for selector in selectors.split():
        name, eq, value = selector.partition("=")
        if not eq or name not in SELECTORS:
            raise ScheduleError(f"{where}: {selector!r} is not steps=SET, layers=SET or paths=a,b")
        if name in fields:
            raise ScheduleError(f"{where}: {name} is given twice")
        fields[name] = value
    return _rule_from_mapping(fields, where)


def parse_schedule(value: Any) -> tuple[ScheduleRule, ...]:
    """Rules from text (``;``-separated), a list of mappings/texts/rules, or None (no rules)."""
    if value is None:
        return ()
    if isinstance(value, str):
        value = [part for part in value.split(";") if part.strip()]
    if isinstance(value, (dict, ScheduleRule)):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise ScheduleError(f"schedule: expected a list of rules, got {type(value).__name__}")
    rules = []
    for n, item in enumerate(value):
        where = f"schedule rule {n}"
        if isinstance(item, ScheduleRule):
            rules.append(item)
        elif isinstance(item, dict):
            rules.append(_rule_from_mapping(item, where))
        elif isinstance(item, str):
            rules.append(_rule_from_text(item, where))
        else:
            raise ScheduleError(f"{where}: expected a mapping such as {{layers: 0-3, codec: residual-int4}}, "
                                f"got {item!r}")
    return tuple(rules)


def format_schedule(rules: Iterable[ScheduleRule]) -> str:
    """The text form `parse_schedule` reads back (empty for no rules)."""
    return "; ".join(str(rule) for rule in rules)


def layer_of(key: Hashable) -> int | None:
    """The layer index of a channel key (its element at `LAYER_POSITION` of its path), else None."""
    if not isinstance(key, tuple) or not key:
        return None
    position = LAYER_POSITION.get(key[0])
    if position is None or len(key) <= position:
        return None
    layer = key[position]
    return layer if isinstance(layer, int) and not isinstance(layer, bool) else None
