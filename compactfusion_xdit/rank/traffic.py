"""The bytes of a request, summed over every rank, and the table ``--compression-stats`` prints."""

from __future__ import annotations

import sys

import torch.distributed as dist

#: What a run without a session (``--compression none``) reports.
NO_TRAFFIC = {"raw_bytes": 0, "sent_bytes": 0, "ratio": 1.0, "paths": {}, "cache_consistent": None,
              "cache_mismatches": None}


def compression_traffic(session) -> dict:
    """Bytes over every rank (a collective over the world group when a session exists):
    ``raw_bytes`` (what the uncompressed exchanges would send), ``sent_bytes``, ``ratio``, per path
    ``{"raw_bytes", "sent_bytes", "messages"}``, ``cache_consistent`` and ``cache_mismatches`` (how
    many mismatches the checks found; both None unless checked). Without a session nothing is
    counted: `NO_TRAFFIC` (with ``--compression none`` the ranks install a counting-only session)."""
    if session is None:
        return {**NO_TRAFFIC, "paths": {}}
    lifecycle = session.lifecycle
    if lifecycle is not None and session.config.check:
        lifecycle.check_caches()  # every message of the request has been received by now
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, session.stats())
    paths: dict[str, dict[str, int]] = {}
    links: dict[str, dict[str, int]] = {}
    for stats in gathered:
        for path, counts in stats["paths"].items():
            total = paths.setdefault(path, {"raw_bytes": 0, "sent_bytes": 0, "messages": 0})
            for k in ("raw_bytes", "sent_bytes", "messages"):
                total[k] += counts[k]
            for link_class, c in counts.get("links", {}).items():  # known hosts: intra/inter-node split
                _add(total.setdefault("links", {}).setdefault(link_class, dict.fromkeys(c, 0)), c)
        for link_class, c in stats.get("links", {}).items():
            _add(links.setdefault(link_class, dict.fromkeys(c, 0)), c)
    raw = sum(p["raw_bytes"] for p in paths.values())
    sent = sum(p["sent_bytes"] for p in paths.values())
    consistent = mismatches = None
    if lifecycle is not None and lifecycle.cache_consistent is not None:
        consistent, mismatches = lifecycle.cache_consistent, len(lifecycle.mismatches)
        if not consistent:
            print("residual caches diverged:\n" + "\n".join(lifecycle.mismatches[:20]), file=sys.stderr)
    out = {"raw_bytes": raw, "sent_bytes": sent, "ratio": raw / sent if sent else 1.0, "paths": paths,
           "cache_consistent": consistent, "cache_mismatches": mismatches}
    if "links" in gathered[0]:
        out["links"] = links
    if "auto" in gathered[0]:  # --compression auto: the agreed decision (the same on every rank)
        out["auto"] = gathered[0]["auto"]
    return out


def _add(total: dict[str, int], counts: dict[str, int]) -> None:
    for k, v in counts.items():
        total[k] += v


def check_verdict(traffic: dict) -> str:
    """The one line ``--compression-check`` prints on rank 0 after a request."""
    if traffic.get("cache_consistent") is None:
        return "cache check: not run (no compressed exchange was checked)"
    if traffic["cache_consistent"]:
        return "cache check: consistent (every receiver cache bitwise equal to its sender's)"
    return f"cache check: DIVERGED ({traffic['cache_mismatches']} mismatches; details above on stderr)"


def format_traffic(traffic: dict) -> str:
    """The per-path byte table ``--compression-stats`` prints."""
    rows = [("path", "messages", "raw bytes", "sent bytes", "ratio")]
    for path, p in sorted(traffic["paths"].items()):
        ratio = p["raw_bytes"] / p["sent_bytes"] if p["sent_bytes"] else 1.0
        rows.append((path, str(p["messages"]), str(p["raw_bytes"]), str(p["sent_bytes"]), f"{ratio:.2f}x"))
    rows.append(("total", str(sum(p["messages"] for p in traffic["paths"].values())), str(traffic["raw_bytes"]),
                 str(traffic["sent_bytes"]), f"{traffic['ratio']:.2f}x"))
    for link_class, c in sorted(traffic.get("links", {}).items()):  # several hosts: the bytes per link class
        ratio = c["raw_bytes"] / c["sent_bytes"] if c["sent_bytes"] else 1.0
        rows.append((link_class, str(c["messages"]), str(c["raw_bytes"]), str(c["sent_bytes"]), f"{ratio:.2f}x"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    table = "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows)
    return "\n".join([table, *format_auto(traffic.get("auto"))])


def format_auto(auto: dict | None) -> list[str]:
    """One line per path auto decided (``--compression auto``): link, choice, expected time, candidates (ms)."""
    if auto is None:
        return []
    if not auto:
        return ["auto: not decided yet (the links are measured during the warm-up steps; with PipeFusion or "
                "step parallelism this request ran raw and the next one is coded with the decision)"]
    return [f"auto {path}: link {r['link_MBps']:.1f} MB/s -> {r['codec']} (expected {r['expected_ms']:.2f} ms/step; "
            + ", ".join(f"{n} {ms:.2f}" for n, ms in r["candidates"].items()) + ")"
            for path, r in sorted(auto.items())]
