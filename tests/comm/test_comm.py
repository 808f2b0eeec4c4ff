"""The compressed communicator on 2 and 3 CPU ranks (gloo).

Each world size is launched once (`scenario` fixture); the rank function runs every scenario and
returns plain results, and each test below checks one property of them.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from compactfusion_xdit import codecs
from compactfusion_xdit.testing import run_ranks

HERE = os.path.abspath(__file__)
STEPS = 5
POISON_STEP = 2
A2A = (3, 4, 16)        # per-destination chunk
GATHER = (5, 8)
RING = ((4, 8), (4, 6))  # k, v
P2P = (6, 10)


def signal(rank: int, tag: int, step: int, shape, dtype=torch.float32) -> torch.Tensor:
    """A smooth per-rank sequence: adjacent steps have cosine similarity cos(0.2) ~ 0.98."""
    g = torch.Generator().manual_seed(1000 * rank + tag)
    a, b = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    return (math.cos(0.2 * step) * a + math.sin(0.2 * step) * b).to(dtype)


def inputs(rank: int, world: int, step: int, poison: bool = False, device: str = "cpu"):
    x = signal(rank, 1, step, (world * A2A[0], *A2A[1:])).to(device)
    g = signal(rank, 2, step, GATHER).to(device)
    k, v = signal(rank, 3, step, RING[0]).to(device), signal(rank, 4, step, RING[1]).to(device)
    p = signal(rank, 5, step, P2P).to(device)
    if poison and rank == 0:
        x[A2A[0], 0, 0] = float("nan")  # the chunk for rank 1 only
        g[1, 1] = float("inf")
        k[0, 0] = float("nan")
        p[2, 3] = float("-inf")
    return x, g, (k, v), p


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float().nan_to_num(0, 0, 0), b.float().nan_to_num(0, 0, 0)
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equal, NaNs included."""
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8))


def one_step(comm, rank: int, world: int, step: int, poisoned: bool = False, async_a2a: bool = False, device: str = "cpu"):
    """Every operation once; returns (received, expected) pairs per op."""
    import torch.distributed as dist

    x, g, kv, p = inputs(rank, world, step, poisoned, device)
    got = {}
    if async_a2a:
        handle = comm.all_to_all(("ulysses", 0, "qkv"), x, async_op=True)
        got["a2a"] = handle.wait()
    else:
        got["a2a"] = comm.all_to_all(("ulysses", 0, "qkv"), x)
    got["gather"] = comm.all_gather(("patch", 0, "kv"), g)
    got["ring"] = list(comm.ring_exchange(("ring", 0), kv))
    nxt, prv = (rank + 1) % world, (rank - 1) % world
    send = comm.isend(("pipefusion", 0), p, dst=nxt)
    got["p2p"] = comm.irecv(("pipefusion", 0), P2P, torch.float32, src=prv, device=device).wait()
    send.wait()
    others = [inputs(r, world, step, poisoned, device) for r in range(world)]
    expect = {
        "a2a": torch.cat([others[s][0][rank * A2A[0]:(rank + 1) * A2A[0]] for s in range(world)]),
        "gather": torch.stack([others[r][1] for r in range(world)]),
        "ring": [((rank - j) % world, others[(rank - j) % world][2]) for j in range(world)],
        "p2p": others[prv][3],
    }
    dist.barrier()
    return got, expect


def errors(got, expect) -> dict:
    out = {"a2a": rel(got["a2a"], expect["a2a"]), "gather": rel(got["gather"], expect["gather"]), "p2p": rel(got["p2p"], expect["p2p"])}
    out["ring"] = max(rel(a, b) for (_, ts), (_, es) in zip(got["ring"], expect["ring"]) for a, b in zip(ts, es))
    out["ring_origins"] = [o for o, _ in got["ring"]] == [o for o, _ in expect["ring"]]
    return out


def check_none(rank: int, world: int, device: str = "cpu") -> dict:
    """`none`: every operation equals the raw torch.distributed operation bitwise."""
    import torch.distributed as dist

    from compactfusion_xdit.comm import CompressedCommunicator
    from compactfusion_xdit.core.residual import ResidualState

    comm = CompressedCommunicator(ResidualState("none"))
    results = {}
    for step in range(2):
        comm.state.set_step(step)
        got, expect = one_step(comm, rank, world, step, async_a2a=step == 1, device=device)
        x, g, kv, p = inputs(rank, world, step, device=device)
        ref = torch.empty_like(x)
        dist.all_to_all_single(ref, x)
        ref_g = torch.empty((world, *g.shape), device=device)
        dist.all_gather_into_tensor(ref_g, g.unsqueeze(0))
        results[f"a2a{step}"] = same(got["a2a"], ref) and same(got["a2a"], expect["a2a"])
        results[f"gather{step}"] = same(got["gather"], ref_g)
        results[f"ring{step}"] = all(same(a, b) for (_, ts), (_, es) in zip(got["ring"], expect["ring"]) for a, b in zip(ts, es))
        results[f"p2p{step}"] = same(got["p2p"], expect["p2p"])
    for dtype in (torch.bfloat16, torch.uint8):
        x = (signal(rank, 9, 0, (world * 2, 3)) * 50).to(dtype).to(device)
        ref = torch.empty_like(x)
        dist.all_to_all_single(ref, x)
        results[f"a2a_{dtype}"] = same(comm.all_to_all(("ulysses", 1, "o"), x), ref)
    results["stats"] = comm.state.stats()
    return results


def check_residual(rank: int, world: int, name: str, device: str = "cpu") -> dict:
    """Several steps of a residual codec: errors, ring origins, cache agreement, byte counts."""
    from compactfusion_xdit.comm import CompressedCommunicator
    from compactfusion_xdit.core.residual import ResidualState

    comm = CompressedCommunicator(ResidualState(name))
    comm.state.begin_request()
    per_step, mismatches = [], []
    for step in range(STEPS):
        comm.state.set_step(step)
        got, expect = one_step(comm, rank, world, step, async_a2a=step % 2 == 1, device=device)
        per_step.append(errors(got, expect))
        mismatches += comm.cache_mismatches()
    # a uint8 tensor on a compressed path passes through raw and bit-exact
    u = (signal(rank, 9, 0, (world * 2, 3)) * 50).to(torch.uint8).to(device)
    import torch.distributed as dist

    ref = torch.empty_like(u)
    dist.all_to_all_single(ref, u)
    uint8_exact = same(comm.all_to_all(("ulysses", 1, "mask"), u), ref)
    return {"errors": per_step, "mismatches": mismatches, "digests": len(comm.state.cache_digests()),
            "stats": comm.state.stats(), "uint8_exact": uint8_exact}


#: The row (of the 2-D codec view) each poisoned message of rank 0 has NaN/Inf in (see `inputs`).
POISONED_ROWS = {"a2a": 0, "gather": 1, "ring_k": 0, "p2p": 2}


def check_nonfinite(rank: int, world: int, name: str, device: str = "cpu") -> dict:
    """Rank 0 sends NaN/Inf at POISON_STEP on every op: the rows arrive NaN-marked in the coded
    message (no other message), caches stay finite and equal, the next step is clean."""
    from compactfusion_xdit.comm import CompressedCommunicator
    from compactfusion_xdit.core.residual import ResidualState

    comm = CompressedCommunicator(ResidualState(name))
    out = {"marked": {}, "mismatches": [], "finite_caches": True}
    for step in range(POISON_STEP + 3):
        comm.state.set_step(step)
        got, expect = one_step(comm, rank, world, step, poisoned=step == POISON_STEP, device=device)
        if step == POISON_STEP:
            received = {}
            if rank == 1:
                received["a2a"] = (got["a2a"][:A2A[0]], expect["a2a"][:A2A[0]])
                received["p2p"] = (got["p2p"], expect["p2p"])
            if rank != 0:
                received["gather"] = (got["gather"][0], expect["gather"][0])
                received["ring_k"] = next((ts[0], es[0]) for (o, ts), (_, es) in zip(got["ring"], expect["ring"]) if o == 0)
            for op, (y, x) in received.items():
                y2, x2 = y.reshape(-1, y.shape[-1]), x.reshape(-1, x.shape[-1])
                nan_rows = y2.isnan().all(dim=1).nonzero().flatten().tolist()
                rest = [i for i in range(y2.shape[0]) if i != POISONED_ROWS[op]]
                out["marked"][op] = nan_rows == [POISONED_ROWS[op]] and rel(y2[rest], x2[rest]) < 0.06
        if step == POISON_STEP + 2:
            out["last_errors"] = errors(got, expect)
        out["finite_caches"] &= all(bool(torch.isfinite(t).all()) for t, _ in
                                    (*comm.state._send.values(), *comm.state._recv.values()))
        out["mismatches"] += comm.cache_mismatches()
    out["stats"] = comm.state.stats()
    return out


def check_all(rank: int, world: int, name: str, device: str = "cpu") -> dict:
    return {"none": check_none(rank, world, device), "residual": check_residual(rank, world, name, device),
            "nonfinite": check_nonfinite(rank, world, name, device), "many": check_many(rank, world, name, device)}


def check_many(rank: int, world: int, name: str, device: str = "cpu") -> dict:
    """Three keys in one `all_to_all_many` against one `all_to_all` per key, on twin states:
    per step equal results (bitwise), then equal stats and cache digests. Step POISON_STEP puts
    NaN into one key's chunk (marked rows in the coded message), a later step resets a key (every
    rank then seeds it again)."""
    from compactfusion_xdit.comm import CompressedCommunicator
    from compactfusion_xdit.core.config import CompressionConfig
    from compactfusion_xdit.core.residual import ResidualState

    config = CompressionConfig.parse(name, warmup=1)
    many, one = (CompressedCommunicator(ResidualState(config)) for _ in range(2))
    keys = [("ulysses", 0, role) for role in ("q", "k", "v")]
    shapes = [(world * 3, 4, 16), (world * 3, 4, 16), (world * 2, 7)]
    equal = []
    for step in range(STEPS):
        for comm in (many, one):
            comm.state.set_step(step)
            if step == STEPS - 1:  # both ends of the ring of links rank -> rank + 1 forget "k"
                comm.state.reset(("ulysses", 0, "k", rank, (rank + 1) % world))
                comm.state.reset(("ulysses", 0, "k", (rank - 1) % world, rank))
        xs = [signal(rank, 40 + i, step, shape).to(device) for i, shape in enumerate(shapes)]
        if step == POISON_STEP:
            xs[1][:, 0, 0] = float("nan")  # in every destination chunk
        together = many.all_to_all_many(keys, xs)
        alone = [one.all_to_all(k, x) for k, x in zip(keys, xs)]
        equal.append(all(torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0)) for a, b in zip(together, alone)))
    return {"equal": equal, "stats": many.state.stats() == one.state.stats(),
            "caches": many.state.cache_digests() == one.state.cache_digests(),
            "coded": many.state.stats()["coded_messages"],
            "marked_and_reseeded": [many.state.stats()["paths"]["ulysses"][f] for f in ("nonfinite_rows", "reseeds")]}


CODEC = "int4" if "int4" in codecs.names() else "int8"


@pytest.fixture(scope="module", params=[2, 3], ids=["2ranks", "3ranks"])
def scenario(request):
    world = request.param
    return world, run_ranks(f"{HERE}:check_all", world, {"name": "residual-" + CODEC}, timeout=90)


def test_none_equals_raw_collectives_bitwise(scenario):
    world, results = scenario
    for rank in range(world):
        none = results[rank]["none"]
        assert all(v for k, v in none.items() if k != "stats"), none
        assert none["stats"]["raw_bytes"] == none["stats"]["sent_bytes"]


def test_residual_results_close_and_ring_yields_every_origin(scenario):
    world, results = scenario
    for rank in range(world):
        errs = results[rank]["residual"]["errors"]
        assert all(e["ring_origins"] for e in errs)
        assert all(e[op] == 0.0 for e in errs[:1] for op in ("a2a", "gather", "ring", "p2p"))  # warm-up raw
        worst = max(e[op] for e in errs[1:] for op in ("a2a", "gather", "ring", "p2p"))
        assert 0.0 < worst < 0.06, worst  # int4 on a residual ~20% of the norm: measured ~0.01-0.02


def test_every_receiver_cache_equals_its_sender_bitwise(scenario):
    world, results = scenario
    for rank in range(world):
        r = results[rank]["residual"]
        assert r["mismatches"] == []
        # a2a: W-1 send + W-1 recv; gather: 1 + W-1; ring: 2 parts x (1 + W-1); p2p: 1 + 1
        assert r["digests"] == 2 * (world - 1) + world + 2 * world + 2
        assert results[rank]["nonfinite"]["mismatches"] == []


def payload(shape):
    n, c = math.prod(shape[:-1]), shape[-1]
    return codecs.get(CODEC).payload_nbytes((n, c), torch.float32)


def test_byte_counts_follow_payload_arithmetic(scenario):
    world, results = scenario
    w1, s1 = world - 1, STEPS - 1
    nbytes = lambda shape: math.prod(shape) * 4  # noqa: E731
    expect = {
        "ulysses": (w1 * STEPS * nbytes(A2A), w1 * nbytes(A2A) + w1 * s1 * payload(A2A), w1 * STEPS),
        "patch": (w1 * STEPS * nbytes(GATHER), w1 * nbytes(GATHER) + w1 * s1 * payload(GATHER), w1 * STEPS),
        "ring": (w1 * STEPS * sum(map(nbytes, RING)), w1 * sum(map(nbytes, RING)) + w1 * s1 * sum(map(payload, RING)), 2 * w1 * STEPS),
        "pipefusion": (STEPS * nbytes(P2P), nbytes(P2P) + s1 * payload(P2P), STEPS),
    }
    for rank in range(world):
        paths = results[rank]["residual"]["stats"]["paths"]
        for path, (raw, sent, messages) in expect.items():
            if path == "ulysses":  # plus the uint8 pass-through: raw == sent
                raw, sent, messages = raw + w1 * 2 * 3, sent + w1 * 2 * 3, messages + w1
            got = paths[path]
            assert (got["raw_bytes"], got["sent_bytes"], got["messages"]) == (raw, sent, messages), (rank, path, got)
        assert results[rank]["residual"]["stats"]["reseeds"] == 0


def test_uint8_passes_through_exactly(scenario):
    world, results = scenario
    assert all(results[r]["residual"]["uint8_exact"] for r in range(world))


def test_nonfinite_rows_arrive_marked_in_band_and_caches_stay_clean(scenario):
    world, results = scenario
    for rank in range(world):
        nf = results[rank]["nonfinite"]
        assert (rank == 0 or nf["marked"]) and all(nf["marked"].values()), (rank, nf["marked"])
        assert nf["finite_caches"] and nf["mismatches"] == [], rank
        last = nf["last_errors"]
        assert max(last[op] for op in ("a2a", "gather", "ring", "p2p")) < 0.06, last
    s0 = results[0]["nonfinite"]["stats"]
    assert s0["nonfinite_rows"] == 4  # a2a chunk to rank 1, gather, ring k, p2p: one row each
    assert s0["reseeds"] == 0  # nothing to re-seed: the caches kept their rows
    # no raw side message: after the warm-up step, p2p sends only payloads
    assert s0["paths"]["pipefusion"]["sent_bytes"] == math.prod(P2P) * 4 + 4 * payload(P2P)


def test_many_keys_in_one_collective_equal_one_collective_per_key(scenario):
    world, results = scenario
    for rank in range(world):
        many = results[rank]["many"]
        assert many["equal"] == [True] * STEPS and many["stats"] and many["caches"], many
        assert many["coded"] > 0 and all(n > 0 for n in many["marked_and_reseeded"]), many


def check_broadcast(rank: int, world: int, name: str) -> dict:
    """`broadcast` from rank 1 over 5 steps: seed (raw), two coded steps, a NaN step (a marked row),
    then a forced-raw broadcast. Returns per step what each rank holds and the leader's stats."""
    from compactfusion_xdit.comm import CompressedCommunicator
    from compactfusion_xdit.core.config import CompressionConfig
    from compactfusion_xdit.core.residual import ResidualState

    comm = CompressedCommunicator(ResidualState(CompressionConfig.parse(name, warmup=1)))
    held, sent = [], []
    for step in range(5):
        comm.state.set_step(step)
        x = signal(1, 60, step, P2P)
        if step == 3:
            x[0, 0] = float("nan")
        sent.append(x.clone())
        buf = x.clone() if rank == 1 else torch.zeros(P2P)
        comm.broadcast(("step", "latents"), buf, src=1, raw=step == 4)
        held.append(buf)
    return {"held": held, "sent": sent, "stats": comm.state.stats()["paths"].get("step"),
            "wire": comm.state.wire_nbytes(P2P, torch.float32, ("step", "latents", 1, "all")),
            "mismatches": comm.cache_mismatches()}


def test_broadcast_codes_one_payload_for_every_receiver():
    world, nbytes = 3, P2P[0] * P2P[1] * 4
    results = run_ranks(f"{HERE}:check_broadcast", world, {"name": "residual-" + CODEC}, timeout=90)
    leader = results[1]
    for rank, r in enumerate(results):
        assert r["mismatches"] == []
        for step, (got, x) in enumerate(zip(r["held"], leader["sent"])):
            if rank == 1 or step in (0, 4):  # the source keeps x; seed and forced-raw steps are exact
                assert same(got, x), (rank, step)
            elif step == 3:  # row 0 held the NaN: it arrives NaN, the rest coded
                assert got[0].isnan().all() and torch.isfinite(got[1:]).all() and rel(got[1:], x[1:]) < 0.1, rank
            else:
                assert 0 < rel(got, x) < 0.1, (rank, step)
    receivers, wire = world - 1, leader["wire"]
    stats = leader["stats"]
    assert stats["messages"] == 5 * receivers and stats["raw_bytes"] == 5 * receivers * nbytes
    # seed raw, 3 coded (the NaN step too), forced raw
    assert stats["sent_bytes"] == receivers * (nbytes + 3 * wire + nbytes)
    assert results[0]["stats"] is None or results[0]["stats"]["messages"] == 0  # receivers count nothing
