"""Cache consistency always: with ``--compression-check`` every receiver's cache equals its
sender's reconstruction bitwise after every message of every step, on every path, for every codec.

The per-message history (compactfusion_xdit.core.cache_history) is compared after the request, so the
check needs no collective during it and covers pipelined PipeFusion stages too. The tests outside the
slow set run PipeFusion (the path whose step-boundary check had to be skipped) over 20 steps with
residual-1bit and residual-int4 with a deliberately corrupted cache; the full matrix (every layout x
every codec, 20 steps) is marked slow: CI does not run it (``python -m pytest -m slow`` does).
"""

from __future__ import annotations

import os

import pytest
import torch

from compactfusion_xdit.testing import run_ranks

HERE = os.path.abspath(__file__)
STEPS = 20
CODECS = ["residual-int8", "residual-int4", "residual-int2", "residual-1bit", "residual-lowrank-4",
          "residual-int4-noef", "int4"]
LAYOUTS = {
    "ulysses": ["--ulysses_degree", "2"],
    "ring": ["--ring_degree", "2"],
    "pipefusion": ["--pipefusion_parallel_degree", "2", "--num_pipeline_patch", "2", "--warmup_steps", "1"],
    "patch-sync": ["--patch_parallel_degree", "2", "--patch_parallel_mode", "sync"],
    "patch-displaced": ["--patch_parallel_degree", "2", "--patch_parallel_mode", "displaced", "--warmup_steps", "1"],
    "step": ["--step_parallel_degree", "2", "--step_parallel_warmup", "1"],
    # 4 ranks: three peers per all-to-all / all-gather, so int8/int4/int2 code them as one stack
    "ulysses-4": ["--ulysses_degree", "4"],
    "patch-sync-4": ["--patch_parallel_degree", "4", "--patch_parallel_mode", "sync"],
}


def world_of(layout: str) -> int:
    return 4 if layout.endswith("-4") else 2


def base_argv(layout: str, steps: int = STEPS) -> list[str]:
    return ["--model", "tiny-flux", "--height", "32", "--width", "32", "--num_inference_steps", str(steps),
            "--prompt", "a cat", "--max_sequence_length", "16", "--seed", "7", "--output_type", "latent",
            *LAYOUTS[layout]]


# --------------------------------------------------------------------------------------------
# Unit level: the history comparison finds what it must (2 ranks, communicator only)
# --------------------------------------------------------------------------------------------


def history_over_paths(rank: int, world: int, corrupt_at: int | None) -> list[str]:
    """6 steps of a2a, all-gather, ring and p2p with residual-int4; rank 1 may corrupt one cache."""
    from compactfusion_xdit.core.cache_history import CacheHistory
    from compactfusion_xdit.comm import CompressedCommunicator, link_key
    from compactfusion_xdit.core.residual import ResidualState

    state = ResidualState("residual-int4")
    history = CacheHistory(state)
    comm = CompressedCommunicator(state)
    state.begin_request()
    gen = torch.Generator().manual_seed(rank)
    base = torch.randn(4 * world, 8, generator=gen)
    for step in range(6):
        state.set_step(step)
        x = base + 0.05 * step * torch.randn(base.shape, generator=gen)
        comm.all_to_all(("ulysses", 0, "qkv"), x)
        comm.all_gather(("patch", 0, "kv"), x[:4])
        list(comm.ring_exchange(("ring", 0), (x[:4], x[4:8])))
        send = comm.isend(("pipefusion", "latent", 0), x, dst=(rank + 1) % world)
        comm.irecv(("pipefusion", "latent", 0), x.shape, x.dtype, src=(rank - 1) % world).wait()
        send.wait()
        if corrupt_at == step and rank == 1:
            state.cache("recv", link_key(("pipefusion", "latent", 0), 0, 1)).add_(1.0)
    return history.mismatches()


def clean_and_corrupted(rank: int, world: int) -> tuple[list[str], list[str]]:
    return history_over_paths(rank, world, None), history_over_paths(rank, world, 3)


def test_history_is_clean_on_every_path_and_names_a_corrupted_cache_at_its_step():
    results = run_ranks(f"{HERE}:clean_and_corrupted", 2, timeout=120)
    assert [clean for clean, _ in results] == [[], []]
    broken = [b for _, b in results]
    assert broken[0] == broken[1] and len(broken[0]) == 1
    line = broken[0][0]
    assert "('pipefusion', 'latent', 0, 0, 1)" in line and "message 4 differs" in line and "step 4" in line


def test_a_message_never_received_is_reported():
    from compactfusion_xdit.core.cache_history import _compare

    assert "never received" in _compare(("ring", 0), [(0, "send", [(0, "ab")])], both_sides=True)
    assert _compare(("ring", 0), [(0, "send", [(0, "ab")]), (1, "recv", [(0, "ab")])], both_sides=True) is None


# --------------------------------------------------------------------------------------------
# Pipeline level: one launch per layout, one request per codec
# --------------------------------------------------------------------------------------------


def check_codecs(rank: int, world: int, argv: list[str], names: list[str], corrupt: bool = False) -> dict:
    """Load once, then one request per compression name with the cache check on; with `corrupt`, a
    last residual-int4 request where rank 1 alters one receiver cache at its 10th scheduler step."""
    from compactfusion_xdit import patches
    from compactfusion_xdit.rank import worker
    from compactfusion_xdit.core.config import CompressionConfig

    args = worker.parse_args(argv + ["--compression", names[0], "--compression-check"])
    loaded = worker.load_pipeline(args)
    runs = [(name, False) for name in names] + ([("residual-int4", True)] if corrupt else [])
    out = {}
    for name, damage in runs:
        patches.install(CompressionConfig.parse(name, check=True, warmup=1))
        session = patches.session()
        if loaded.mode is not None:  # patch parallelism hands back a handle holding the mode
            getattr(loaded.mode, "mode", loaded.mode).session = session
        if session is not None:
            session.begin_request(reset_stats=True)
        scheduler_step = loaded.pipe.scheduler.step
        if damage:
            calls = [0]

            def step_and_damage(*a, **k):
                calls[0] += 1
                if calls[0] == 10 and rank == 1:
                    keys = sorted((k for side, k in session.lifecycle.history.entries if side == "recv"), key=repr)
                    session.state.cache("recv", keys[0]).add_(1.0)
                return scheduler_step(*a, **k)

            object.__setattr__(loaded.pipe.scheduler, "step", step_and_damage)  # the wrapper forwards writes
        worker.call_pipeline(loaded, args)
        object.__setattr__(loaded.pipe.scheduler, "step", scheduler_step)
        session.lifecycle.check_caches()
        entries = session.lifecycle.history.entries
        stats = session.stats()
        out[name + (" (corrupted)" if damage else "")] = {
            "consistent": session.lifecycle.cache_consistent, "mismatches": session.lifecycle.mismatches[:3],
            "keys": len(entries), "messages": sum(len(s) for s in entries.values()),
            "steps": sorted({step for seq in entries.values() for step, _ in seq}),
            "lengths": sorted({len(seq) for seq in entries.values()}),
            "coded": stats["coded_messages"]}
    return out


def assert_consistent(results: list[dict], names: list[str]) -> None:
    for rank, per_codec in enumerate(results):
        for name in names:
            r = per_codec[name]
            assert r["consistent"] is True, (rank, name, r["mismatches"])
            assert r["coded"] > 0 and r["messages"] > 0, (rank, name, r)


@pytest.mark.slow  # ~2 min of launches; run with -m slow
def test_pipefusion_caches_checked_at_every_message_over_20_steps():
    names = ["residual-1bit"]
    results = run_ranks(f"{HERE}:check_codecs", 2, {"argv": base_argv("pipefusion"), "names": names,
                                                    "corrupt": True}, timeout=400, init_process_group=False)
    assert_consistent(results, names)
    for per_codec in results:
        # one message per channel and patch-phase step: 19 (the first of the 20 steps is PipeFusion's
        # synchronous warm-up), 18 on the channels that carry a step's result to the next step;
        # every one of them checked on both ends
        assert per_codec["residual-1bit"]["lengths"] == [STEPS - 2, STEPS - 1], per_codec["residual-1bit"]["lengths"]
        corrupted = per_codec["residual-int4 (corrupted)"]
        assert corrupted["consistent"] is False
        assert any(m.startswith("history: ") and "differs" in m for m in corrupted["mismatches"]), corrupted


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_codec_keeps_caches_bitwise_equal_over_20_steps(layout):
    results = run_ranks(f"{HERE}:check_codecs", world_of(layout), {"argv": base_argv(layout), "names": CODECS},
                        timeout=600, init_process_group=False)
    residual = [n for n in CODECS if n.startswith("residual-")]
    assert_consistent(results, residual)
    for rank, per_codec in enumerate(results):
        plain = per_codec["int4"]  # plain mode keeps no cache: nothing can diverge
        assert plain["consistent"] is True and plain["coded"] > 0
        if layout in ("ulysses", "ring", "patch-sync", "ulysses-4", "patch-sync-4"):
            assert per_codec["residual-int4"]["steps"] == list(range(STEPS)), (rank, per_codec["residual-int4"]["steps"])
