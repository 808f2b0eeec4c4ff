"""One rank of a benchmark launch: load the pipeline once, then serve requests in phases.

    python -m compactfusion_xdit.benchmarks.rank_loop SPEC.json     # RANK, WORLD_SIZE, MASTER_* set

SPEC holds ``runs`` (one worker argv per run, e.g. one per codec; each run builds its own process
group on port ``port + j``, so xfuser is imported once per launch), ``phases`` (per run) and
``requests`` (measured requests per phase, after one warm-up request), ``workdir``, and ``pin``
(bind rank r to the r-th CPU). Before
phase k (counted over all runs), rank 0 writes ``phase<k>.want`` and every rank waits for the
controller's ``phase<k>.go`` (the controller changes the links in between). Each request runs
between two barriers; rank 0's wall time between them is the request's latency. Rank r writes
``rank<r>.json`` (per run, latencies per phase, and the traffic and auto's report of the phase's
last request: auto has settled by then) and, where it holds the pipeline output,
``image_run<j>_rank<r>.npy`` (uint8, the last request of the run's first phase).
With ``items`` (a list of request overrides, e.g. ``{"prompt": "digit 7", "seed": 1}``) a run is
one phase serving each item once instead, saving ``item<k>_run<j>_rank<r>.npy``.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

from compactfusion_xdit.rank import traffic as rank_traffic


def _wait_for(path: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {path} within {timeout:.0f} s (controller gone?)")
        time.sleep(0.02)


def _begin_request(session, link: int | None = None) -> None:
    """`link`: the phase, given as the request's shape so that ``--compression auto`` measures each
    rate afresh, as a launch on that link would (a decision holds while the shape does)."""
    if session is not None:
        session.begin_request(reset_stats=True, shape=None if link is None else ("link", link))


def _image_array(out) -> np.ndarray | None:
    images = getattr(out, "images", None) if out is not None else None
    if images is None or len(images) == 0:
        return None
    first = images[0]
    if hasattr(first, "convert"):
        return np.asarray(first.convert("RGB"))
    array = np.asarray(first)
    return (np.clip(array, 0, 1) * 255).round().astype(np.uint8) if array.dtype != np.uint8 else array


def run(spec: dict) -> None:
    import torch

    from compactfusion_xdit.reliability import orphans

    orphans.exit_with_parent(parent=os.getppid())  # the launcher (`ip netns exec` execs into us)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    workdir = spec["workdir"]
    runs, rank, phase = [], int(os.environ.get("RANK", "0")), 0
    if spec.get("pin"):
        _pin(rank)
    for j, argv in enumerate(spec["runs"]):
        os.environ["MASTER_PORT"] = str(spec["port"] + j)
        if j > 0:
            _reinit_world()
        record, images = _one_run(argv, spec, phase)
        runs.append(record)
        phase += spec["phases"] if not spec.get("items") else 1
        for k, image in enumerate(images):
            if image is not None:
                name = f"item{k}_run{j}" if spec.get("items") else f"image_run{j}"
                np.save(os.path.join(workdir, f"{name}_rank{rank}.npy"), image)
    with open(os.path.join(workdir, f"rank{rank}.json"), "w") as f:
        json.dump({"rank": rank, "runs": runs}, f)


def _pin(rank: int) -> None:
    """Bind this rank (and the threads it starts later: gloo's) to one CPU, rank r to the r-th
    allowed CPU modulo their count: one core per rank, as one device per rank in a deployment."""
    cpus = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpus[rank % len(cpus)]})


def _reinit_world() -> None:
    """A later run in this process: build torch.distributed and xfuser's world group afresh. The
    previous run destroyed both, and observed here, a second `worker.load_pipeline` in one process
    otherwise fails in xfuser's ``initialize_model_parallel`` ("world group is not initialized")."""
    import torch.distributed as dist
    from xfuser.core.distributed import init_distributed_environment

    if not dist.is_initialized():
        init_distributed_environment(world_size=int(os.environ["WORLD_SIZE"]), rank=int(os.environ["RANK"]),
                                     local_rank=int(os.environ.get("LOCAL_RANK", "0")), distributed_init_method="env://")


def _one_run(argv: list[str], spec: dict, first_phase: int):
    import torch.distributed as dist

    from compactfusion_xdit import patches
    from compactfusion_xdit.rank import outputs
    from compactfusion_xdit.rank import worker

    args = worker.parse_args(argv)
    loaded = worker.load_pipeline(args)
    from xfuser.core.distributed import get_runtime_state, get_world_group

    rank = get_world_group().rank
    outputs.quiet_progress(loaded.pipe, 1)
    session = patches.session()
    workdir = spec["workdir"]
    record = {"phases": []}
    image = None
    items = spec.get("items")
    if items:
        return _serve_items(loaded, args, session, spec, first_phase, rank, items, record)
    for phase in range(first_phase, first_phase + spec["phases"]):
        if rank == 0:
            open(os.path.join(workdir, f"phase{phase}.want"), "w").close()
        _wait_for(os.path.join(workdir, f"phase{phase}.go"), spec.get("phase_timeout", 600))
        latencies, traffic = [], None
        for i in range(1 + spec["requests"]):
            _begin_request(session, phase)
            dist.barrier()
            start = time.perf_counter()
            out = worker.call_pipeline(loaded, args)
            dist.barrier()
            latencies.append(time.perf_counter() - start)
            counted = rank_traffic.compression_traffic(session)
            if session is not None:
                session.end_request()
            if i == spec["requests"]:  # the last: with auto, what its decision settled on
                traffic = {k: counted[k] for k in ("raw_bytes", "sent_bytes", "paths")}
                auto = session.stats().get("auto") if session is not None else None
                if auto:  # --compression auto: what it measured and chose per path on this link
                    traffic["auto"] = auto
                if phase == first_phase:
                    image = _image_array(out)
        record["phases"].append({"warmup_s": latencies[0], "latencies_s": latencies[1:], **traffic})
    get_runtime_state().destroy_distributed_env()
    return record, [image]


def _serve_items(loaded, args, session, spec, phase, rank, items, record):
    """Each item once (fidelity runs): images per item, traffic of the first."""
    from xfuser.core.distributed import get_runtime_state

    from compactfusion_xdit.rank import worker

    if rank == 0:
        open(os.path.join(spec["workdir"], f"phase{phase}.want"), "w").close()
    _wait_for(os.path.join(spec["workdir"], f"phase{phase}.go"), spec.get("phase_timeout", 600))
    images, traffic, latencies = [], None, []
    for item in items:
        _begin_request(session)
        overrides = {k: v for k, v in item.items() if k != "seed"}
        start = time.perf_counter()
        out = worker.call_pipeline(loaded, args, seed=item.get("seed"), **overrides)
        latencies.append(time.perf_counter() - start)
        counted = rank_traffic.compression_traffic(session)
        if session is not None:
            session.end_request()
        if traffic is None:
            traffic = {k: counted[k] for k in ("raw_bytes", "sent_bytes", "paths")}
        images.append(_image_array(out))
    record["phases"].append({"warmup_s": latencies[0], "latencies_s": latencies[1:], **traffic})
    get_runtime_state().destroy_distributed_env()
    return record, images

if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        run(json.load(f))
