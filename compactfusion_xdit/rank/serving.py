"""The one request loop of a rank, shared by the worker (``xfuser``) and the drop-in runner (``cfx-xdit``).

    results = serving.serve_requests(session, requests, run_one)    # run_one(request) -> pipeline output

Per request: the plugin's caches start empty (`CompressionSession.begin_request`), its traffic is
counted alone, and every cache is dropped when it ends, so none outlives its request; a request
that fails drops its caches and wire buffers before the error goes on.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Any, Callable, Sequence

from compactfusion_xdit import envs
from compactfusion_xdit.cli.checks import UsageError
from compactfusion_xdit.rank import traffic as rank_traffic
from compactfusion_xdit.reliability import liveness


@dataclasses.dataclass
class Served:
    """One request as this rank saw it: its settings, the pipeline output, time and traffic."""

    request: Any
    output: Any
    elapsed_s: float
    traffic: dict


def request_shape(request: Any) -> tuple | None:
    """What `--compression auto` compares to know a request's shape changed: height, width, steps."""
    shape = tuple(getattr(request, k, None) for k in ("height", "width", "num_inference_steps"))
    return None if shape == (None, None, None) else shape


def serve_requests(session, requests: Sequence[Any], run_one: Callable[[Any], Any]) -> list[Served]:
    """Run `run_one(request)` for each request in order (a collective per request when a session exists)."""
    served = []
    for request in requests:
        if session is not None:
            session.begin_request(reset_stats=True, shape=request_shape(request))
        start = time.perf_counter()
        try:
            output = run_one(request)
        except BaseException:
            if session is not None:
                session.abandon_request()  # a failed request leaves no cache or buffer behind
            raise
        elapsed = time.perf_counter() - start
        traffic = rank_traffic.compression_traffic(session)
        if session is not None:
            session.end_request()
        served.append(Served(request, output, elapsed, traffic))
    return served


def run_rank(body: Callable[[], int], prog: str = "") -> int:
    """A rank's exit status: `body()`'s, 2 after a UsageError (one line), 1 after any other failure
    (one line, naming a lost peer when there is one; ``CFX_DEBUG=1`` re-raises for the traceback)."""
    prefix = f"{prog}: " if prog else ""
    try:
        return body()
    except UsageError as err:
        print(f"{prefix}error: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        if envs.flag(envs.DEBUG):
            raise
        lost = liveness.lost_ranks_note()
        print(f"{prefix}error (rank {os.environ.get('RANK', '0')}): {lost}{type(err).__name__}: {err}  "
              "[set CFX_DEBUG=1 for the traceback]", file=sys.stderr)
        return 1
