"""What to compress and how: `CompressionConfig` and the one parser for the names users type.

    CompressionConfig.parse("residual-int4")            # residual channel, int4 codec, error feedback
    CompressionConfig.parse("residual-int4-noef")       # the same without error feedback (ablation)
    CompressionConfig.parse("int4")                     # plain quantisation of x (alias "plain-int4")
    CompressionConfig.parse("residual-lowrank-8", warmup=2, paths="ulysses,ring")
    CompressionConfig.parse("none")                     # no compression: the raw collectives
    CompressionConfig.parse("auto", auto_floor="residual-int4")  # per path from the measured link (core/auto.py)
    CompressionConfig.parse("residual-int4", scope="inter-node")  # code only the links between nodes (core/scope.py)

Names: ``none``; ``<codec>`` or ``plain-<codec>`` (plain mode: the codec codes x itself);
``residual-<codec>`` (residual mode with error feedback) and ``residual-<codec>-noef`` (without).
``<codec>`` is any name `compactfusion_xdit.codecs.get` accepts, user-registered codecs included.

A schedule picks another name per message from its path, layer and step (`compactfusion_xdit.core.schedule`):

    CompressionConfig.parse("residual-int4", schedule="steps=0-1:none; layers=8-:residual-1bit")
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Iterable

from compactfusion_xdit.core.schedule import ScheduleRule, parse_schedule
from compactfusion_xdit.core.scope import check_scope

#: The communication paths a config can switch on; a channel key's first element is one of these.
PATHS = ("ulysses", "ring", "pipefusion", "legacy", "patch", "step")
#: plain: code x itself; residual: code x minus the receiver's cache; none: send raw;
#: auto: a residual codec or none per path, chosen at run time from the measured link (core/auto.py).
MODES = ("plain", "residual", "none", "auto")
AUTO = "auto"
#: The names auto chooses from, finest first; ``auto_floor`` names the coarsest it may pick.
AUTO_CANDIDATES = ("none", "residual-int8", "residual-int4", "residual-int2", "residual-1bit")

#: The built-in codecs (`compactfusion_xdit.codecs`), named here so that checking a name needs no
#: torch import (the launchers check flags before anything heavy); a test keeps the two equal.
BUILTIN_CODECS = ("none", "int8", "int4", "int2", "1bit")
_LOWRANK = re.compile(r"lowrank-([1-9][0-9]*)")

_RESIDUAL_PREFIX = "residual-"
_PLAIN_PREFIX = "plain-"
_NO_EF_SUFFIX = "-noef"


def _codec_names() -> list[str]:
    from compactfusion_xdit import codecs

    return [n for n in codecs.names() if n != "none"]


def valid_names() -> list[str]:
    """Every spelling `CompressionConfig.parse` accepts (``<R>`` stands for a positive integer)."""
    names = ["none", AUTO]
    for codec in _codec_names():
        names += [codec, _PLAIN_PREFIX + codec, _RESIDUAL_PREFIX + codec, _RESIDUAL_PREFIX + codec + _NO_EF_SUFFIX]
    return names


def _check_codec(codec: str, typed: str) -> None:
    if codec in BUILTIN_CODECS or _LOWRANK.fullmatch(codec):
        return
    from compactfusion_xdit import codecs  # a codec registered in this process, or a bad name

    try:
        codecs.get(codec)
    except ValueError as err:
        raise ValueError(
            f"unknown compression {typed!r} ({err}). "
            f"Valid names: {', '.join(valid_names())}"
        ) from None


def _normalise_paths(paths: str | Iterable[str]) -> tuple[str, ...]:
    if isinstance(paths, str):
        items = [p.strip() for p in paths.split(",") if p.strip()]
    else:
        items = list(paths)
    if items == ["all"]:
        return PATHS
    unknown = [p for p in items if p not in PATHS]
    if unknown:
        raise ValueError(f"unknown compression path(s) {unknown}; valid paths: {', '.join(PATHS)} (or 'all')")
    if not items:
        raise ValueError(f"compression paths must name at least one of {', '.join(PATHS)} (or 'all')")
    return tuple(p for p in PATHS if p in items)


@dataclass(frozen=True)
class CompressionConfig:
    """How one process compresses its exchanges (immutable; build it with `parse`).

    codec: codec name (`codecs.get`); ``"none"`` exactly when mode is ``"none"``.
    mode: ``plain`` codes x, ``residual`` codes x minus the cache both sides hold, ``none`` sends raw.
    error_feedback: residual mode only; on, the sender caches the receiver's reconstruction so each
        step's coding error is carried into the next residual; off, it caches x (ablation).
    warmup: the first `warmup` steps of a request send raw tensors (and seed the caches).
    paths: the communication paths that compress; the others send raw.
    check: verify that sender and receiver caches stay bitwise equal (slow; for debugging).
    schedule: rules choosing another compression name per (path, layer, step); the first rule that
        matches a message wins, the others use codec/mode above (`compactfusion_xdit.core.schedule`).
        Error feedback is one setting for every residual name of the config.
    """

    codec: str = "none"
    mode: str = "none"
    error_feedback: bool = True
    warmup: int = 1
    paths: tuple[str, ...] = PATHS
    check: bool = False
    schedule: tuple[ScheduleRule, ...] = ()
    #: auto mode: the coarsest name auto may pick (`core.auto.CANDIDATES`), and how many requests a
    #: decision holds (0: the whole launch, unless the request shape changes).
    auto_floor: str = "residual-int2"
    auto_every: int = 0
    #: ``all``: every link of the paths above; ``inter-node``: only exchanges whose ranks sit on
    #: more than one host, the rest raw (`compactfusion_xdit.core.scope`).
    scope: str = "all"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown compression mode {self.mode!r}; valid modes: {', '.join(MODES)}")
        if (self.mode == AUTO) != (self.codec == AUTO):
            raise ValueError(f"codec {self.codec!r} with mode {self.mode!r}: codec 'auto' goes with mode 'auto' only")
        if self.mode == AUTO:
            _check_auto(self)
        if (self.mode == "none") != (self.codec == "none"):
            raise ValueError(
                f"codec {self.codec!r} with mode {self.mode!r}: codec 'none' goes with mode 'none' and only with it"
            )
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"warmup must be an integer >= 0 (raw steps at the start of a request), got {self.warmup!r}")
        object.__setattr__(self, "paths", _normalise_paths(self.paths))
        check_scope(self.scope)
        if self.codec not in ("none", AUTO):
            _check_codec(self.codec, self.codec)
        object.__setattr__(self, "schedule", _resolve_schedule(self.schedule))
        # (mode, codec) of each rule, in rule order; `choice` reads it per message.
        object.__setattr__(self, "_rule_choices", tuple(_rule_choice(r) for r in self.schedule))

    @classmethod
    def parse(cls, name: "str | CompressionConfig | None", **overrides: Any) -> "CompressionConfig":
        """Build a config from a typed name (see the module docstring) plus field overrides.

        ``overrides`` set fields after parsing, e.g. ``error_feedback=False``, ``warmup=2``,
        ``paths="ulysses,ring"`` (a comma list, an iterable or ``"all"``), ``check=True``.
        A config passes through (with the overrides applied); ``None`` means ``"none"``.
        """
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise ValueError(f"unknown compression setting(s) {unknown}; valid settings: {', '.join(sorted(fields))}")
        if isinstance(name, CompressionConfig):
            return dataclasses.replace(name, **overrides)
        if name is None:
            name = "none"
        if not isinstance(name, str):
            raise ValueError(f"compression must be a name such as 'residual-int4', got {type(name).__name__}")
        typed = name
        text = name.strip()
        if text == "none":
            return cls(**{"codec": "none", "mode": "none", **overrides})
        if text == AUTO:
            return cls(**{"codec": AUTO, "mode": AUTO, **overrides})
        error_feedback = True
        if text.startswith(_RESIDUAL_PREFIX):
            mode, codec = "residual", text[len(_RESIDUAL_PREFIX):]
            if codec.endswith(_NO_EF_SUFFIX):
                codec, error_feedback = codec[: -len(_NO_EF_SUFFIX)], False
        elif text.startswith(_PLAIN_PREFIX):
            mode, codec = "plain", text[len(_PLAIN_PREFIX):]
        else:
            mode, codec = "plain", text
        if codec.endswith(_NO_EF_SUFFIX):
            raise ValueError(f"{typed!r}: '-noef' only applies to residual names, e.g. 'residual-int4-noef'")
        if codec in ("", "none"):
            raise ValueError(f"unknown compression {typed!r}; use 'none' for no compression. Valid names: {', '.join(valid_names())}")
        _check_codec(codec, typed)
        settings = {"codec": codec, "mode": mode, "error_feedback": error_feedback, **overrides}
        return cls(**settings)

    @property
    def name(self) -> str:
        """The canonical name: ``parse(config.name)`` gives back codec, mode and error feedback."""
        if self.mode in ("none", AUTO):
            return self.mode
        if self.mode == "plain":
            return self.codec
        return _RESIDUAL_PREFIX + self.codec + ("" if self.error_feedback else _NO_EF_SUFFIX)

    @property
    def enabled(self) -> bool:
        """Whether any message may be coded (the default name or a schedule rule)."""
        return self.mode != "none" or any(mode != "none" for mode, _ in self._rule_choices)

    def compresses(self, path: str) -> bool:
        """Whether messages on `path` may be coded (all raw otherwise). Unknown paths are an error."""
        if path not in PATHS:
            raise ValueError(f"unknown communication path {path!r}; valid paths: {', '.join(PATHS)}")
        if path not in self.paths:
            return False
        return self.mode != "none" or any(
            mode != "none" and (rule.paths is None or path in rule.paths)
            for rule, (mode, _) in zip(self.schedule, self._rule_choices))

    def choice(self, path: str, layer: int | None, step: int) -> tuple[str, str]:
        """``(mode, codec)`` for a message on `path` at `layer` (None: the key has none) and `step`:
        the first schedule rule that matches, else the config's own. Ignores `paths` (see `compresses`)."""
        for rule, chosen in zip(self.schedule, self._rule_choices):
            if rule.matches(path, layer, step):
                return chosen
        return (self.mode, self.codec)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for stats files and logs."""
        d = dataclasses.asdict(self)
        d["paths"] = list(self.paths)
        d["schedule"] = [str(rule) for rule in self.schedule]
        d["name"] = self.name
        return d


def _check_auto(config: "CompressionConfig") -> None:
    """auto needs a raw warm-up to measure in, and a floor among its candidates."""
    if config.warmup < 1:
        raise ValueError("compression 'auto' measures the link during the raw warm-up step(s) and got warm-up 0; "
                         "set --compression-warmup 1 or more (YAML compression: {warmup: 1}; warmup=1 in the API)")
    if config.auto_floor not in AUTO_CANDIDATES:
        raise ValueError(f"auto floor {config.auto_floor!r} is not one of {', '.join(AUTO_CANDIDATES)} "
                         f"(--compression-auto-floor names the coarsest codec auto may pick)")
    if isinstance(config.auto_every, bool) or not isinstance(config.auto_every, int) or config.auto_every < 0:
        raise ValueError(f"auto_every must be an integer >= 0 (requests a decision holds; 0: never re-measure), "
                         f"got {config.auto_every!r}")


def _resolve_schedule(schedule: Any) -> tuple[ScheduleRule, ...]:
    """Rules with canonical compression names; a ValueError naming the rule for a bad one."""
    rules = parse_schedule(schedule)
    out = []
    for n, rule in enumerate(rules):
        where = f"schedule rule {n} ({rule})"
        if rule.codec.strip().endswith(_NO_EF_SUFFIX):
            raise ValueError(f"{where}: error feedback is one setting for the whole config; name "
                             f"{rule.codec.strip()[: -len(_NO_EF_SUFFIX)]!r} and turn error feedback off for all")
        try:
            name = CompressionConfig.parse(rule.codec).name
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
        if rule.paths is not None:
            unknown = [p for p in rule.paths if p not in PATHS]
            if unknown:
                raise ValueError(f"{where}: unknown path(s) {unknown}; valid paths: {', '.join(PATHS)}")
        out.append(dataclasses.replace(rule, codec=name))
    return tuple(out)


def _rule_choice(rule: ScheduleRule) -> tuple[str, str]:
    parsed = CompressionConfig.parse(rule.codec)
    return (parsed.mode, parsed.codec)
