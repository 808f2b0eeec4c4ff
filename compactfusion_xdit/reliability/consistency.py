"""Start-of-run agreement: every rank must run the same configuration.

Ranks that disagree on the compression config, the parallel layout or the software versions do
not fail cleanly later: their messages have different sizes or kinds and a collective waits
forever, or caches silently diverge. So right after the process group exists each rank publishes
one digest per field, and any difference stops every rank with the same message, naming the field
and which ranks hold which value.

    fields = consistency.run_fields(compression=config.to_dict(), parallel={...}, model="tiny-flux")
    consistency.check_ranks(fields)      # collective; raises ConfigMismatch on every rank

Knows nothing of xfuser beyond reading its version string.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from typing import Any

import torch
import torch.distributed as dist


class ConfigMismatch(ValueError):
    """Ranks disagree on a setting; the message names the field and the ranks of each value."""


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def software_versions() -> dict[str, str]:
    """Versions whose mismatch changes what travels on the wire."""
    return {"compactfusion_xdit": _version("compactfusion-xdit"), "xfuser": _version("xfuser"),
            "torch": torch.__version__}


def run_fields(**fields: Any) -> dict[str, Any]:
    """`fields` (JSON-serialisable values; a dict value becomes one field per key, ``name.key``)
    plus one field per software version (``version.<package>``)."""
    out: dict[str, Any] = {}
    for name, value in fields.items():
        if isinstance(value, dict):
            out.update({f"{name}.{k}": v for k, v in value.items()})
        else:
            out[name] = value
    out.update({f"version.{name}": v for name, v in software_versions().items()})
    return out


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def digest(value: Any) -> str:
    """A short checksum of a JSON-serialisable value (key order does not matter)."""
    return hashlib.blake2b(_canonical(value).encode(), digest_size=8).hexdigest()


def differences(per_rank: list[dict[str, tuple[str, str]]]) -> list[str]:
    """One line per field whose digest differs between ranks: ``per_rank[r][field] = (digest, shown)``."""
    lines = []
    fields = sorted({f for ranks in per_rank for f in ranks})
    for field in fields:
        groups: dict[str, tuple[str, list[int]]] = {}
        for rank, entries in enumerate(per_rank):
            d, shown = entries.get(field, ("<missing>", "<missing>"))
            groups.setdefault(d, (shown, []))[1].append(rank)
        if len(groups) > 1:
            parts = "; ".join(f"{shown} on rank{'s' if len(r) > 1 else ''} {', '.join(map(str, r))}"
                              for shown, r in groups.values())
            lines.append(f"{field!r} differs: {parts}")
    return lines


def check_ranks(fields: dict[str, Any], group: dist.ProcessGroup | None = None) -> None:
    """Collective over `group` (default: the world): raise `ConfigMismatch` on every rank when any
    field differs between ranks. A no-op without an initialised process group."""
    if not dist.is_available() or not dist.is_initialized():
        return
    local = {name: (digest(value), _shown(value)) for name, value in fields.items()}
    gathered: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, local, group=group)
    lines = differences(gathered)
    if lines:
        raise ConfigMismatch("the ranks were started with different settings, so their exchanges would not match: "
                             + " | ".join(lines) + ". Start every rank with the same flags, config file and versions")


def _shown(value: Any, limit: int = 120) -> str:
    text = _canonical(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
