"""``--compression auto``: each path's codec chosen from the measured link, never slower than raw.

The life of a decision (one `AutoSelector` per `ResidualState` whose config is in auto mode):

1. Measure. During the raw warm-up steps of a request (``step < warmup``; auto needs warmup >= 1)
   the communicator times every RAW/SEED exchange of an auto path (`clock` / `observe`): bytes
   on the wire and seconds from posting to completion, per path, plus a reference to the path's
   last raw tensor. The link's seconds per byte is the slope between its smallest and largest
   exchanges (`link_fit`: the fixed latency cancels, coding saves only bytes), each size's time
   its lower quartile (the slow end includes waiting for a peer that is still computing). Timing goes through `link_seconds`, the one place a test fakes the link
   (``CFX_AUTO_LINK_MBPS``, e.g. ``0.01`` or ``ulysses=0.01,ring=1e6``).
2. Agree. At the first coded step (`ResidualState.set_step` reaching ``warmup``) every rank times
   the candidate codecs' ``encode_block`` + ``decode_block`` on a sample of each path's last raw
   tensor (a few repeats, min), then one ``all_gather_object`` on the world group (every rank
   makes it at the same point) shares the settings and the measurements. Every rank checks the
   settings match (else every rank raises the same one-line error) and computes the same decision
   from the same gathered data: per path, the candidate minimising the expected time the slowest
   rank loses to the exchange (`exposed_seconds`): the raw wait measured at each exchange's point
   of use, less what the smaller payload saves on the link, plus encode + decode. A transfer that
   hid behind compute (PipeFusion's hops, displaced patches' gathers, ring hops behind attention)
   left no wait, so coding it only costs; ``none`` wins when coding does not pay. Candidates:
   none, residual-int8, -int4, -int2, -1bit, up to the floor (``auto_floor``).
   PipeFusion and step parallelism (`between_requests`): their ranks are not in lock-step within a
   request (a collective there would wait for a stage that waits for it), so the measured request
   is sent raw throughout and the ranks agree in `begin_request` of the next request, where no rank
   has anything in flight. Their point-to-point links are probed all at once (`probe_links`). The
   coded candidate that would cost least were its transfers waited on whole (`_best_coded`) then
   runs that request on trial, and holds only if its steps after the warm-up beat the raw
   request's by `TRIAL_MARGIN` (`settle_trial`, at the next begin), else the paths go raw: a
   pipeline's waits compound in ways a per-exchange model under-counts.
   A lock-step path whose best coded candidate the model puts within `CODING_MARGIN` of ``none``,
   either side (a near-tie: inside the model's error), goes raw for the rest of the request, whose
   time after the agreement is then the raw side of the same trial: the next request tries the
   candidate (`start_trial`, at its begin), the one after settles it.
3. Hold. The decision holds for the launch; it is dropped (and measured again in the next
   request's warm-up, or the whole next request between requests) when the request shape given
   to `begin_request` changes or every ``auto_every`` requests (0: never).

Pure core: knows nothing of xfuser; the group is the default (world) process group.
"""

from __future__ import annotations

import time
from typing import Any, Hashable

import torch

from compactfusion_xdit import envs
from compactfusion_xdit.core.config import AUTO_CANDIDATES as CANDIDATES
from compactfusion_xdit.core.config import CompressionConfig

#: Environment variable that replaces the measured link throughput (MB/s; tests, what-if runs).
FAKE_RATE_ENV = envs.AUTO_LINK_MBPS
SAMPLE_ELEMENTS = 1 << 16  # elements of a path's raw tensor the codec timing codes
REPEATS = 3
PROBE_REPEATS = 5  # all-to-alls per size in a link probe (the fastest counts)
PROBE_TINY_BYTES = 64  # per peer: the probe's latency-only message
#: A codec must save this share of the raw exchange's expected time to be chosen: the model leaves
#: out each coded message's fixed costs (plans, buffers, Python), so a near-tie goes to ``none``.
#: It was 0.2 while PipeFusion decided on the model alone (on an unshaped veth link, 521 MB/s, its
#: int2 was modelled 5 % under none and measured slower); the between-requests paths now try their
#: pick, and on lock-step paths 0.2 hid real gains (4 ranks, Ulysses at 1 Gbit/s: int2 modelled 14 %
#: under none, measured 1.32x faster).
CODING_MARGIN = 0.1
PROBE_TAG = 0xA07  # point-to-point tag of the link probes (world group, between requests)
#: A pick on trial (between requests, or a lock-step near-tie) is kept only if the coded part of
#: its request (the steps after the warm-up) ran this much faster than the raw request's, slowest
#: rank against slowest rank.
TRIAL_MARGIN = 0.03


clock = time.perf_counter  # what times a trial's steps (tests replace it)


def candidates(floor: str) -> tuple[str, ...]:
    """The candidate names from ``none`` down to `floor` inclusive."""
    if floor not in CANDIDATES:
        raise ValueError(f"auto floor {floor!r} is not one of {', '.join(CANDIDATES)}")
    return CANDIDATES[: CANDIDATES.index(floor) + 1]


def link_seconds(path: str, nbytes: int, seconds: float) -> float:
    """The time a raw exchange of `nbytes` on `path` counts for: the measured `seconds`, or
    ``nbytes`` at the rate ``$CFX_AUTO_LINK_MBPS`` gives (one number, or ``path=rate,...``)."""
    fake = envs.get(FAKE_RATE_ENV)
    if not fake:
        return seconds
    rate = None
    for item in fake.split(","):
        name, sep, value = item.strip().partition("=")
        if not sep:
            rate = float(name)
        elif name.strip() == path:
            rate = float(value)
            break
    return seconds if rate is None else nbytes / (rate * 1e6)


class AutoSelector:
    """Measurements, the agreed decision and its report for one `ResidualState` in auto mode."""

    def __init__(self, config) -> None:
        self.config = config
        self.floor = config.auto_floor
        self.candidates = candidates(self.floor)
        self.decision: dict[str, str] | None = None  # path -> compression name, once agreed
        self.report: dict[str, dict[str, Any]] = {}
        self.decisions = 0  # how many times the ranks agreed (1 for a launch with one shape)
        self.parsed: dict[str, tuple[str, str]] = {}  # name -> (mode, codec), for ResidualState.choice
        self._shape: Hashable = None  # the request shape the decision was made for
        self._requests_since = 0  # requests with coded steps since the decision
        self._coded = False  # the current request reached a coded step under the decision
        #: Agree in `begin_request` on what the previous request measured, not at the first coded
        #: step (set by layouts whose ranks are not in lock-step: PipeFusion, step parallelism).
        self.between_requests = False
        self._ran = False  # a step of the current request was set (every rank alike: see `stepped`)
        self._span = [None, None]  # perf_counter of this request's first and last step after the warm-up
        #: While a pick is on trial: {"paths": {path: the codec tried}, "raw_s": the raw request's
        #: part after the warm-up, slowest rank (None while that request still runs: a lock-step
        #: near-tie, see `agree`)}; None otherwise.
        self.trial: dict[str, Any] | None = None
        self._reset_measurements()

    def _reset_measurements(self) -> None:
        self._bytes: dict[str, int] = {}
        self._times: dict[str, dict[int, list[float]]] = {}  # path -> bytes of an exchange -> its seconds
        self._waits: dict[str, dict[int, list[float]]] = {}  # ... -> seconds its first wait blocked
        self._groups: dict[str, Any] = {}  # path -> the process group its collectives ran on (probed)
        self._links: dict[str, set[tuple[int, int]]] = {}  # path -> (src, dst) global ranks of its p2p receives
        self._probed: dict[str, tuple[float, float]] = {}  # path -> (latency s, s per byte) of its probe
        self._samples: dict[str, torch.Tensor] = {}
        self._steps: set[int] = set()

    # ----- lifecycle ----------------------------------------------------------------------------
    @property
    def pending(self) -> bool:
        return self.decision is None

    def begin_request(self, shape: Hashable = None) -> bool:
        """A request starts; drop the decision when `shape` (if given) differs from the one it was
        made for, or after ``auto_every`` requests. Returns whether it was dropped. Between
        requests, a pending decision is agreed here (a collective) when the previous request ran
        steps for the same shape."""
        ran, self._ran = self._ran, False
        span = self._take_span() if ran else None
        if self.decision is None:
            if shape is not None and self._shape is not None and shape != self._shape:
                self._reset_measurements()  # measured for another shape: measure this one
                ran = False
            if shape is not None:
                self._shape = shape
            if ran and self.between_requests:
                self.agree(span)  # every rank: the same begin calls and steps, so the same answer
            return False
        if self.trial is not None and ran and shape in (None, self._shape):
            if self.trial["raw_s"] is None:
                self.start_trial(span)  # a collective, at the same begin on every rank
            else:
                self.settle_trial(span)  # likewise
            return False
        if self._coded:  # a request nested in another's begin (the pipeline's own) is not counted
            self._requests_since += 1
            self._coded = False
        every = self.config.auto_every
        if (shape is not None and self._shape is not None and shape != self._shape) or (every and self._requests_since >= every):
            self.decision = None
            self.trial = None
            self._shape = shape
            self._reset_measurements()
            return True
        return False

    def stepped(self, step: int | None = None) -> None:
        """A step of the current request was set. Every rank sets steps in a request that exchanges
        anything (the lifecycle patch at each backbone call; step parallelism at each window end),
        so whether one did since the last `begin_request` is the same on every rank. Steps from
        the warm-up on are timed (`_take_span`)."""
        self._ran = True
        if step is not None and step >= self.config.warmup:
            now = clock()
            if self._span[0] is None:
                self._span[0] = now
            self._span[1] = now

    def _take_span(self) -> float | None:
        """Seconds from the first to the last step after the warm-up of the request just ended (the
        part coding changes; a request's first steps also pay one-off costs); None without two."""
        first, last = self._span
        self._span = [None, None]
        return None if first is None or last <= first else last - first

    def coded_step(self) -> None:
        """The current request reached a coded step under the decision (counts it for ``auto_every``)."""
        self._coded = True

    # ----- measurement (called by the communicator on RAW/SEED exchanges) -----------------------
    def clock(self, step: int) -> float | None:
        """A start time when exchanges are measured now (pending decision, and a warm-up step or
        any step between requests), else None."""
        if self.decision is None and (step < self.config.warmup or self.between_requests):
            self._steps.add(step)
            return time.perf_counter()
        return None

    def observe(self, path: str, nbytes: int, start: float, sample: torch.Tensor | None = None,
                group: Any = None, link: tuple[int, int] | None = None, hidden: float = 0.0) -> None:
        """One raw exchange of `path` finished: `nbytes` this rank put on (or, for a receive, took
        off) the wire since `start`; on the collective `group`, or the point-to-point `link`
        (src, dst global ranks), if given: `agree` probes it. `hidden`: the seconds between
        posting and the first wait, which the transfer spent alongside the caller's work (a
        pipeline's compute); the rest, the wait at the point of use, is what coding can shorten."""
        seconds = link_seconds(path, nbytes, time.perf_counter() - start)
        self._waits.setdefault(path, {}).setdefault(nbytes, []).append(max(seconds - hidden, 0.0))
        if group is not None:
            self._groups[path] = group
        if link is not None:
            self._links.setdefault(path, set()).add(tuple(link))
        self._bytes[path] = self._bytes.get(path, 0) + nbytes
        self._times.setdefault(path, {}).setdefault(nbytes, []).append(seconds)
        if sample is not None and sample.is_floating_point() and sample.numel():
            self._samples[path] = sample

    def measurements(self) -> dict[str, dict[str, Any]]:
        """This rank's view per measured path: bytes per warm-up step, throughput (MB/s), the
        exchanges per step by size with the median wait each cost at its point of use (``waits``
        [(bytes, per step, s)]), and the codec cost (seconds per raw byte) and payload ratio of
        each candidate."""
        steps = max(len(self._steps), 1)
        out = {}
        for path, nbytes in self._bytes.items():
            latency, per_byte = self._probed.get(path) or link_fit(self._times[path])
            sample = self._samples.get(path)
            waits = [(n, len(w) / steps, _low_quantile(w, 0.5)) for n, w in sorted(self._waits[path].items())]
            out[path] = {"bytes_per_step": nbytes / steps, **_link_view(latency, per_byte), "waits": waits,
                         "codecs": _codec_costs(sample, self.candidates, self.config.error_feedback)}
        return out

    # ----- agreement -------------------------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        """What every rank must share for the decision to mean the same on both ends of a link."""
        c = self.config
        return {"auto floor": self.floor, "auto every": c.auto_every, "warmup": c.warmup,
                "paths": ",".join(c.paths), "error feedback": c.error_feedback}

    def agree(self, span: float | None = None) -> dict[str, str]:
        """Measure the codecs, share everything with one world collective, decide (same on every
        rank). When some rank received on point-to-point links, a second collective follows the
        probe of those links (`probe_links`). Between requests, `span`: this rank's seconds of the
        measured raw request after its warm-up; the best coded candidate (`_best_coded`) is then
        tried on the next request (`settle_trial`) unless the link is faked."""
        import torch.distributed as dist

        for path in sorted(self._groups):  # every member of a path's group has that path: the probes pair up
            sample = self._samples.get(path)
            biggest = max(self._times[path])
            self._probed[path] = probe_link(path, self._groups[path], biggest, sample.device if sample is not None else None)
        mine = {"settings": self.settings(), "measured": self.measurements(), "span": span,
                "links": {path: sorted(links) for path, links in self._links.items()},
                "biggest": {path: max(self._times[path]) for path in self._links}}
        gathered = _gather(mine)
        check_settings(gathered)
        links = _links_of(gathered)
        if links and len(gathered) > 1:  # every rank gathered the same links: every rank probes them alike
            probed = {path: probe_links(path, pairs, nbytes, dist.get_rank()) for path, (pairs, nbytes) in links.items()}
            everyone = _gather({p: r for p, r in probed.items() if r is not None})
            for entry, results in zip(gathered, everyone):
                for path, (latency, per_byte) in results.items():
                    if path in entry["measured"]:
                        entry["measured"][path].update(_link_view(latency, per_byte))
        self.decision, self.report = decide(gathered, self.candidates)
        spans = [entry.get("span") for entry in gathered]
        trials = not envs.get(FAKE_RATE_ENV) and len(self.candidates) > 1
        if self.between_requests and trials and all(spans):
            tried = {path: _best_coded(expected_ms(gathered, path, self.candidates, whole=True))
                     for path in self.report}
            self.trial = {"paths": tried, "raw_s": max(spans)}
            self.decision = dict(tried)
            self._report_trial(None, None)
        elif not self.between_requests and trials:
            near = {path: _best_coded(r["candidates"]) for path, r in self.report.items()
                    if r["codec"] == "none" and _near_tie(r["candidates"])}
            if near:  # the rest of this request runs raw there: its time is the raw side of the trial
                self.trial = {"paths": near, "raw_s": None}
                now = clock()
                self._span = [now, now]  # from after this agreement
        self.decisions += 1
        self._requests_since = 0
        self._coded = False
        self._samples.clear()  # no tensor of the request outlives the decision
        return self.decision

    def start_trial(self, span: float | None) -> dict[str, str]:
        """A lock-step near-tie (`agree`: the model put the best coded candidate within
        `CODING_MARGIN` of ``none``): the request that ran raw there after the agreement has ended;
        one world collective shares each rank's `span` of it, and the next request tries the
        candidate."""
        spans = _gather(span)
        if not all(spans):
            self.trial = None
            return self.decision
        self.trial["raw_s"] = max(spans)
        self.decision = {**self.decision, **self.trial["paths"]}
        self._report_trial(None, None)
        return self.decision

    def settle_trial(self, span: float | None) -> dict[str, str]:
        """End the trial: one world collective shares each rank's `span` of the trial request; its
        codecs hold if the slowest rank's span beat the raw request's by `TRIAL_MARGIN`, else the
        tried paths send raw (``none``). Same data on every rank, same answer."""
        spans = _gather(span)
        coded_s = max(spans) if all(spans) else None
        kept = coded_s is not None and coded_s < (1.0 - TRIAL_MARGIN) * self.trial["raw_s"]
        if not kept:
            self.decision = {**self.decision, **{path: "none" for path in self.trial["paths"]}}
        self._report_trial(coded_s, kept)
        self.trial = None
        self._requests_since = 0
        self._coded = False
        return self.decision

    def _report_trial(self, coded_s: float | None, kept: bool | None) -> None:
        """Each tried path's report: the current decision and the trial (pending: kept None)."""
        for path, codec in self.trial["paths"].items():
            report = self.report[path]
            report["codec"] = self.decision[path]
            report["expected_ms"] = report["candidates"][report["codec"]]
            report["trial"] = {"codec": codec, "raw_s": round(self.trial["raw_s"], 4),
                               "coded_s": None if coded_s is None else round(coded_s, 4), "kept": kept}

    def stats(self) -> dict[str, Any]:
        return {path: dict(r) for path, r in self.report.items()}


def _near_tie(candidates: dict[str, float]) -> bool:
    """Whether the best coded candidate is expected within `CODING_MARGIN` of ``none``, either side."""
    if len(candidates) < 2:
        return False
    return candidates[_best_coded(candidates)] <= (1.0 + CODING_MARGIN) * candidates["none"]


def _best_coded(candidates: dict[str, float]) -> str:
    """The coded candidate with the least expected ms (ties: the finer one, listed first). The trial
    ranks them by their whole transfers (`expected_ms` with ``whole``): where the request's own
    waits showed a saving the per-exchange model missed (a pipeline's compounding waits, halo
    waits absorbed by a blocking exchange), that model's hidden transfers tie the coded candidates
    and codec-timing noise picks among them; counted whole, the smaller payload wins on a slow link
    and the cheaper codec on a fast one."""
    coded = [name for name in candidates if name != "none"]
    return min(coded, key=lambda n: (candidates[n], coded.index(n)))


def _gather(obj: Any) -> list:
    """Every rank's `obj` in rank order (one ``all_gather_object`` on the world), or ``[obj]`` alone."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _low_quantile(values: list[float], q: float = 0.25) -> float:
    """The q-quantile (lower) of `values`. An exchange's time is the transfer plus the wait for a
    peer still computing; the fast end of the distribution is the link's own time, so a compute
    imbalance does not pass for a slow link (an error that way only favours `none`)."""
    ordered = sorted(values)
    return ordered[int(q * (len(ordered) - 1))]


def _link_view(latency: float, per_byte: float) -> dict[str, float]:
    return {"MBps": 1 / max(per_byte, 1e-15) / 1e6, "latency_us": latency * 1e6}


def _links_of(gathered: list[dict]) -> dict[str, tuple[list[tuple[int, int]], int]]:
    """Per point-to-point path any rank received on: every rank's links (sorted, deduplicated) and
    the biggest message any rank measured (both ends of a link must post the same size)."""
    out = {}
    for path in sorted({p for entry in gathered for p in entry["links"]}):
        pairs = sorted({tuple(pair) for entry in gathered for pair in entry["links"].get(path, ())})
        out[path] = (pairs, max(entry["biggest"][path] for entry in gathered if path in entry["biggest"]))
    return out


def link_fit(times: dict[int, list[float]]) -> tuple[float, float]:
    """(latency s, s per byte) of a path from its exchanges' seconds by size: ``t = latency + n *
    per_byte`` through the lower quartiles of the smallest and largest sizes. Coding shrinks only
    the per-byte part, so that slope, not the mean rate, decides (on a fast link small messages are
    all latency). One size only: its lower quartile over its bytes (latency counted as transfer)."""
    lows = sorted((n, _low_quantile(ts)) for n, ts in times.items())
    (n0, t0), (n1, t1) = lows[0], lows[-1]
    if n1 == n0:
        return 0.0, t0 / n0
    per_byte = max((t1 - t0) / (n1 - n0), 0.0)
    return max(t0 - per_byte * n0, 0.0), per_byte


def probe_link(path: str, group: Any, nbytes: int, device=None, repeats: int = PROBE_REPEATS) -> tuple[float, float]:
    """(latency s, s per byte) of `group`'s links, every rank of the group calling it at once: the
    fastest of `repeats` all-to-alls right after a barrier (so no rank waits for a peer still
    computing), of `nbytes` (this rank's bytes on the wire) and of a tiny message. The exchanges
    during the warm-up time the link with the peers' compute skew in it; this times the link."""
    import torch.distributed as dist

    world = dist.get_world_size(group)
    if world < 2:
        return 0.0, 0.0
    device = torch.device("cpu") if device is None else device
    timed = []
    for per_peer in (PROBE_TINY_BYTES, max(nbytes // (world - 1), PROBE_TINY_BYTES + 1)):
        send = torch.zeros(world * per_peer, dtype=torch.uint8, device=device)
        recv = torch.empty_like(send)
        best = _fastest(lambda: dist.all_to_all_single(recv, send, group=group), group, device, repeats)
        sent = (world - 1) * per_peer
        timed.append((sent, link_seconds(path, sent, best)))
    return _line(timed)


def probe_links(path: str, links: list[tuple[int, int]], nbytes: int, me: int,
                repeats: int = PROBE_REPEATS) -> tuple[float, float] | None:
    """(latency s, s per byte) of this rank's part in the point-to-point `links` (src, dst global
    ranks), every rank of the world calling it at once with the same links: the fastest of
    `repeats` rounds right after a world barrier, each round posting every link's message at once
    (a pipeline's stages all send to the next at once), of `nbytes` and of a tiny message. This
    rank's bytes in a round are those of its busier direction; None when it is in no link."""
    import torch.distributed as dist

    from compactfusion_xdit.comm import p2p

    peers_out = [dst for src, dst in links if src == me]
    peers_in = [src for src, dst in links if dst == me]
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    timed = []
    for size in (PROBE_TINY_BYTES, max(nbytes, PROBE_TINY_BYTES + 1)):
        send = torch.zeros(size, dtype=torch.uint8, device=device)
        recvs = [torch.empty_like(send) for _ in peers_in]

        def round_trip():
            if peers_out or peers_in:
                sent, received = p2p.post(dist.group.WORLD, sends=[(send, dst, PROBE_TAG) for dst in peers_out],
                                          recvs=[(buf, src, PROBE_TAG) for buf, src in zip(recvs, peers_in)])
                sent.wait()
                received.wait()

        best = _fastest(round_trip, None, device, repeats)  # a rank in no link still joins the barriers
        moved = size * max(len(peers_out), len(peers_in))
        timed.append((moved, link_seconds(path, moved, best) if moved else 0.0))
    return _line(timed) if peers_out or peers_in else None


def _fastest(run, group: Any, device: torch.device, repeats: int) -> float:
    """Seconds of the fastest of `repeats` calls of `run()`, each right after a barrier of `group`."""
    import torch.distributed as dist

    best = float("inf")
    for _ in range(repeats):
        dist.barrier(group=group)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def _line(timed: list[tuple[int, float]]) -> tuple[float, float]:
    """(latency s, s per byte) through a small and a large message's (bytes, seconds)."""
    (n0, t0), (n1, t1) = timed
    per_byte = max((t1 - t0) / (n1 - n0), 0.0)
    return max(t0 - per_byte * n0, 0.0), per_byte


def check_settings(gathered: list[dict]) -> None:
    """Raise one line when a rank's auto settings differ from rank 0's (every rank raises alike)."""
    first = gathered[0]["settings"]
    for rank, entry in enumerate(gathered[1:], start=1):
        for name, value in entry["settings"].items():
            if value != first.get(name):
                raise RuntimeError(
                    f"compression auto: rank {rank} has {name} {value!r} but rank 0 has {first.get(name)!r}; "
                    f"launch every rank with the same --compression-* settings (a decision both ends of a link "
                    f"do not share would corrupt the exchange)")


def exposed_seconds(view: dict[str, Any], name: str) -> float:
    """A rank's expected seconds per step that `name` costs on a path: per exchange, the raw wait
    at its point of use, shortened by what the smaller payload saves on the link (never below 0),
    plus encode + decode. A transfer that hid behind the caller's work (a pipeline's compute) left
    no wait, so coding it only costs; one waited on at once waits its whole transfer. A view
    without ``waits`` counts every transfer whole."""
    ratio, cost = view["codecs"].get(name, (1.0, 0.0))
    rate = max(view["MBps"], 1e-12) * 1e6
    n = view["bytes_per_step"]
    waits = view.get("waits") or [(n, 1.0, n / rate)]
    return sum(count * (max(wait - n * (1.0 - ratio) / rate, 0.0) + n * cost) for n, count, wait in waits)


def expected_ms(gathered: list[dict], path: str, names: tuple[str, ...], whole: bool = False) -> dict[str, float]:
    """Per name, the milliseconds per step it is expected to cost `path` on the slowest rank
    (`exposed_seconds`); `whole`: counting every transfer whole, as if waited on at once."""
    views = [entry["measured"][path] for entry in gathered if path in entry["measured"]]
    if whole:
        views = [{**v, "waits": None} for v in views]
    return {name: max(exposed_seconds(v, name) for v in views) * 1e3 for name in names}


def decide(gathered: list[dict], names: tuple[str, ...]) -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
    """Per path measured by any rank: the name in `names` whose expected exchange time
    (`exposed_seconds`) on the slowest rank is least (ties: the finer one, so ``none`` first), and
    ``none`` unless that saves at least `CODING_MARGIN` of none's time. Pure: same input, same output."""
    paths = sorted({p for entry in gathered for p in entry["measured"]})
    decision, report = {}, {}
    for path in paths:
        views = [entry["measured"][path] for entry in gathered if path in entry["measured"]]
        expected = expected_ms(gathered, path, names)
        best = min(names, key=lambda n: (expected[n], names.index(n)))
        if best != "none" and "none" in expected and expected[best] > (1.0 - CODING_MARGIN) * expected["none"]:
            best = "none"
        decision[path] = best
        report[path] = {"link_MBps": round(min(v["MBps"] for v in views), 3), "codec": best,
                        "expected_ms": round(expected[best], 4),
                        "candidates": {n: round(ms, 4) for n, ms in expected.items()}}
    return decision, report


def _codec_costs(sample: torch.Tensor | None, names: tuple[str, ...], error_feedback: bool) -> dict[str, tuple]:
    """Per candidate: (payload bytes / raw bytes, seconds of encode_block + decode_block per raw
    byte), timed on up to `SAMPLE_ELEMENTS` of `sample` (min of `REPEATS`). No sample: no coding."""
    costs: dict[str, tuple] = {"none": (1.0, 0.0)}
    if sample is None:
        return {n: (1.0, float("inf")) if n != "none" else (1.0, 0.0) for n in names}
    from compactfusion_xdit import codecs

    x2 = sample.detach().reshape(-1, sample.shape[-1] if sample.dim() else 1)  # the codec view: (rows, last dim)
    rows = max(1, min(x2.shape[0], SAMPLE_ELEMENTS // max(x2.shape[1], 1)))
    x3 = x2[:rows].clone().unsqueeze(0)
    x3 = torch.nan_to_num(x3)
    raw = x3.numel() * x3.element_size()
    for name in names:
        if name == "none":
            continue
        codec = codecs.get(CompressionConfig.parse(name).codec)
        n = codec.payload_nbytes(tuple(x3.shape[1:]), x3.dtype)
        wire = torch.empty((1, n), dtype=torch.uint8, device=x3.device)
        out = torch.empty_like(x3)
        best = float("inf")
        for _ in range(REPEATS):
            send_base, recv_base = x3 * 0.9, x3 * 0.9
            if x3.is_cuda:
                torch.cuda.synchronize(x3.device)
            start = time.perf_counter()
            codec.encode_block(x3, send_base, wire, 0, True, error_feedback)
            codec.decode_block(wire, 0, recv_base, out, True)
            if x3.is_cuda:
                torch.cuda.synchronize(x3.device)
            best = min(best, time.perf_counter() - start)
        costs[name] = (n / raw, best / raw)
    return costs
