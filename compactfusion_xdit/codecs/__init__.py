"""Tensor codecs: `get(name)` returns a codec with `encode`, `decode` and residual coding.

    from compactfusion_xdit import codecs
    c = codecs.get("int4")
    p = c.encode(x)        # Payload: packed uint8 data + bf16 scales; p.nbytes is its wire size
    y = c.decode(p)        # x's shape and dtype

Built-in names: none, int8, int4, int2, 1bit, lowrank-R (R a positive integer). Wire format and
arithmetic: docs/codec_format.md. Add your own with `register(name, factory)`.
"""

from __future__ import annotations

import re
from typing import Callable

from .base import Codec, Payload
from .identity import NoneCodec
from .lowrank import LowRankCodec
from .onebit import OneBitCodec
from .rowquant import AbsmaxCodec, Int2Codec

__all__ = ["Codec", "Payload", "get", "names", "register", "unregister", "is_valid", "prefetch"]

_BUILTIN: dict[str, Callable[[], Codec]] = {
    "none": NoneCodec,
    "int8": lambda: AbsmaxCodec(8),
    "int4": lambda: AbsmaxCodec(4),
    "int2": Int2Codec,
    "1bit": OneBitCodec,
}
_LOWRANK = re.compile(r"lowrank-(\d+)")
_user: dict[str, Callable[[], Codec]] = {}


def names() -> list[str]:
    """Every valid codec name; `lowrank-<R>` stands for any positive integer R."""
    return list(_BUILTIN) + ["lowrank-<R>"] + sorted(n for n in _user if n not in _BUILTIN)


def is_valid(name: str) -> bool:
    try:
        get(name)
    except ValueError:
        return False
    return True


def get(name: str) -> Codec:
    """The codec called `name`; a ValueError listing the valid names if there is none."""
    if not isinstance(name, str):
        raise ValueError(f"codec name must be a string, got {name!r}")
    if name in _user:
        return _user[name]()
    if name in _BUILTIN:
        return _BUILTIN[name]()
    m = _LOWRANK.fullmatch(name)
    if m and int(m.group(1)) >= 1:
        return LowRankCodec(int(m.group(1)))
    hint = ""
    if name.startswith("lowrank"):
        hint = " (lowrank needs a positive integer rank, e.g. lowrank-8)"
    raise ValueError(f"unknown codec {name!r}{hint}; valid codecs: {', '.join(names())}")


def register(name: str, factory: Callable[[], Codec], replace: bool = False) -> None:
    """Make `factory()` available as codec `name` everywhere a built-in name is accepted."""
    if not isinstance(name, str) or not name or "," in name:
        raise ValueError(f"codec name must be a non-empty string without commas, got {name!r}")
    builtin = name in _BUILTIN or _LOWRANK.fullmatch(name) is not None
    if builtin and not replace:
        raise ValueError(f"{name!r} is a built-in codec; pass replace=True to override it")
    if name.startswith(("plain-", "residual-")):
        raise ValueError(f"codec names may not start with 'plain-' or 'residual-' (those are modes): {name!r}")
    codec = factory()
    if not isinstance(codec, Codec):
        raise TypeError(f"factory for {name!r} must return a codecs.Codec, got {type(codec).__name__}")
    _user[name] = factory


def unregister(name: str) -> None:
    """Remove a user codec registered with `register`."""
    _user.pop(name, None)


def prefetch() -> None:
    """Start loading the compiled CPU kernels in the background (they decide at first use)."""
    from .base import _cpu_backend

    cpu = _cpu_backend()
    if cpu is not None:
        cpu.prefetch()
