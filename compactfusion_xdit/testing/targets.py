"""Rank targets and commands the tests share (`run_ranks("compactfusion_xdit.testing.targets:NAME", ...)`).

    out = run_ranks("compactfusion_xdit.testing.targets:worker_latents", 2, {"argv": argv},
                    init_process_group=False)      # the output rank's latents, None elsewhere
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys


def worker_latents(rank: int, world_size: int, argv: list[str]):
    """One worker run (``xfuser``'s per-rank code) in this process; the output rank returns its latents."""
    from compactfusion_xdit.rank import worker

    result = worker.run_pipeline(worker.parse_args(argv))
    return result.output.float() if result.is_output_rank else None


def worker_latents_in_turn(rank: int, world_size: int, argvs: list[list[str]]):
    """Several worker runs one after the other (cheaper than a launch each: imports dominate)."""
    return [worker_latents(rank, world_size, argv) for argv in argvs]


def worker_runs(rank: int, world_size: int, runs: list[list[str]], ports: list[int]):
    """Several worker runs in turn, each on its own master port (xfuser tears its groups down after
    a run). Returns (latents or None, stats) per run."""
    from compactfusion_xdit.rank import worker

    outs = []
    for argv, port in zip(runs, ports):
        os.environ["MASTER_PORT"] = str(port)
        result = worker.run_pipeline(worker.parse_args(argv))
        outs.append((result.output.float() if result.is_output_rank else None, result.stats))
    return outs


def worker_served_in_turn(rank: int, world_size: int, runs: list[tuple[list[str], str]], ports: list[int]) -> list:
    """Per (argv, fake auto link rate, "" for none) one worker launch on its own master port, serving
    every ``--prompt`` of argv as a request. Returns per launch the output rank's latents and the
    stats of each request, and this rank's ``--compression auto`` decision (None without auto)."""
    from compactfusion_xdit import envs, patches
    from compactfusion_xdit.rank import requests, worker

    out = []
    for (argv, rate), port in zip(runs, ports):
        os.environ["MASTER_PORT"], os.environ[envs.AUTO_LINK_MBPS] = str(port), rate
        results = worker.serve(worker.parse_args(argv), requests.listed_requests(argv, None))
        session = patches.session()
        auto = session.state.auto if session is not None else None
        out.append({"latents": [r.output.float() if r.is_output_rank else None for r in results],
                    "stats": [r.stats for r in results], "decision": auto.decision if auto is not None else None})
    return out


@functools.lru_cache(maxsize=None)
def xfuser_command() -> tuple[str, ...]:
    """The ``xfuser`` console script when it runs this package (the one imported here), else
    ``python -m compactfusion_xdit.cli.launcher`` (another checkout installed, or none)."""
    module = (sys.executable, "-m", "compactfusion_xdit.cli.launcher")
    script = shutil.which("xfuser")
    if not script:
        return module
    with open(script, "rb") as f:
        shebang = f.readline()
    interpreter = shebang[2:].decode(errors="replace").strip() if shebang.startswith(b"#!") else sys.executable
    probe = subprocess.run([interpreter, "-c", "import compactfusion_xdit; print(compactfusion_xdit.__file__)"],
                           cwd=os.path.dirname(script), capture_output=True, text=True, timeout=120)
    import compactfusion_xdit

    ours = compactfusion_xdit.__file__
    return (script,) if probe.returncode == 0 and os.path.samefile(probe.stdout.strip(), ours) else module
