"""Per-path fidelity runs: each run's raw pipeline output and traffic per path, on CPU ranks (gloo).

    outs = serve_on_ranks([argv_none, argv_int4], ranks=2, requests=[{"prompt": "a cat", "seed": 0}], timeout=300)
    outs[1][0]["output"], outs[1][0]["traffic"]["paths"]["ulysses"]   # run 1, request 0

One launch of `ranks` processes (``compactfusion_xdit.testing.run_ranks``); every rank does the runs
in turn (one worker argv each, e.g. one per codec), each in its own process group on its own port,
loading the pipeline and serving every request through ``compactfusion_xdit.rank.worker.serve``.
Unlike ``runs.launch`` (which keeps uint8 images), the output stays as the pipeline returned it:
float latents for ``--output_type latent``, RGB uint8 arrays for ``pil``. Traffic is summed over
all ranks (``rank.traffic.compression_traffic``): ``raw_bytes``, ``sent_bytes``, ``paths`` (per path raw,
sent and message counts) and ``cache_consistent`` (None unless ``--compression-check``).
"""

from __future__ import annotations

import os

import numpy as np

TRAFFIC_KEYS = ("raw_bytes", "sent_bytes", "paths", "cache_consistent")


def _as_array(output) -> np.ndarray | None:
    """The first item of a pipeline output (latents batch, image list or frames) as a numpy array."""
    if output is None or len(output) == 0:
        return None
    first = output[0]
    if hasattr(first, "convert"):  # PIL image
        return np.asarray(first.convert("RGB"))
    if hasattr(first, "detach"):
        return first.detach().float().cpu().numpy()
    return np.asarray(first)


def serve_runs(rank: int, world_size: int, runs: list[list[str]], ports: list[int], requests: list[dict]) -> list:
    """Rank target: per run, per request, ``{"output": array on the output rank else None, "traffic"}``."""
    from compactfusion_xdit.rank import worker
    from compactfusion_xdit.rank.requests import Request

    outs = []
    for argv, port in zip(runs, ports):
        os.environ["MASTER_PORT"] = str(port)
        results = worker.serve(worker.parse_args(argv), [Request(**r) for r in requests])
        outs.append([{"output": _as_array(r.output) if r.is_output_rank else None,
                      "traffic": {k: r.stats.get(k) for k in TRAFFIC_KEYS}} for r in results])
    return outs


def serve_on_ranks(runs: list[list[str]], ranks: int, requests: list[dict], timeout: float) -> list[list[dict]]:
    """`serve_runs` on `ranks` ranks; per run, per request: the output (from the rank holding it)
    and the traffic over all ranks. Raises ``testing.RankFailure`` with the ranks' log tails."""
    from compactfusion_xdit.testing import free_port, run_ranks

    per_rank = run_ranks(f"{__name__}:serve_runs", ranks,
                         {"runs": runs, "ports": [free_port() for _ in runs], "requests": requests},
                         timeout=timeout, init_process_group=False)
    merged = []
    for j in range(len(runs)):
        entries = []
        for k in range(len(requests)):
            held = [r[j][k]["output"] for r in per_rank if r[j][k]["output"] is not None]
            entries.append({"output": held[-1] if held else None, "traffic": per_rank[0][j][k]["traffic"]})
        merged.append(entries)
    return merged


def path_traffic(traffic: dict, paths: list[str]) -> dict:
    """Raw and sent bytes and messages of `paths` only (e.g. ``["ulysses", "ring"]``)."""
    counted = traffic.get("paths") or {}
    return {k: sum(counted.get(p, {}).get(k, 0) for p in paths) for k in ("raw_bytes", "sent_bytes", "messages")}
