"""Bad tensors: hostile values round-trip within each codec's documented arithmetic
(docs/codec_format.md), and NaN/Inf never enter a cache on any exchange path.

Values: zeros, constants, a huge dynamic range (1e-8 .. 1e4), float16's edges (+-65504, the
smallest subnormal 2^-24, the smallest normal 2^-14), any N and C (odd ones and 1 included).
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from compactfusion_xdit import codecs
from compactfusion_xdit.codecs.base import bf16_round, to_dtype
from compactfusion_xdit.testing import run_ranks

HERE = os.path.abspath(__file__)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FAMILIES = ["zeros", "constant", "dynamic_range", "fp16_edges", "normal"]


def hostile(family: str, n: int, c: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if family == "zeros":
        x = torch.zeros(n, c)
    elif family == "constant":
        x = torch.full((n, c), float(torch.randn(1, generator=g)) * 100)
    elif family == "dynamic_range":  # magnitudes spread log-uniformly over 1e-8 .. 1e4, random signs
        mags = 10 ** (torch.rand(n, c, generator=g) * 12 - 8)
        x = mags * torch.where(torch.rand(n, c, generator=g) < 0.5, -1.0, 1.0)
    elif family == "fp16_edges":
        edges = torch.tensor([65504.0, -65504.0, 2.0**-24, -(2.0**-24), 2.0**-14, 0.0, 1.0, -1.0])
        x = edges[torch.randint(0, len(edges), (n, c), generator=g)]
    else:
        x = torch.randn(n, c, generator=g)
    big = torch.finfo(dtype).max
    return x.clamp(-big, big).to(dtype)


def reference(name: str, x: torch.Tensor) -> torch.Tensor | None:
    """deq(encode(x)) as docs/codec_format.md writes it (float32 arithmetic, saturating cast);
    None for lowrank (checked by its own bound)."""
    v = x.float()
    n, c = v.shape
    if name in ("int8", "int4"):
        qmax = 127 if name == "int8" else 7
        s = bf16_round(v.abs().amax(1) / torch.full((n,), float(qmax)))[:, None]
        q = torch.where(s > 0, torch.clamp(torch.round(v / s), -qmax, qmax), torch.zeros_like(v))
        return to_dtype(q * s, x.dtype)
    if name == "int2":
        d = bf16_round((v.abs().sum(1) / torch.full((n,), float(c))) * 1.25)[:, None]
        q = torch.where(d > 0, torch.clamp(torch.floor(v / d), -2, 1), torch.zeros_like(v))
        return to_dtype((q + 0.5) * d, x.dtype)
    if name == "1bit":
        a = v.abs()
        m = bf16_round(a.mean(0))
        tt = a.mean(1)
        tbar = tt.mean()
        t = bf16_round(torch.where(tbar > 0, tt / tbar, torch.zeros_like(tt)))
        sign = torch.where(v >= 0, 1.0, -1.0)
        return to_dtype(sign * (m[None, :] * t[:, None]), x.dtype)
    if name == "none":
        return x
    return None


@settings(max_examples=150, deadline=None)
@given(name=st.sampled_from(["none", "int8", "int4", "int2", "1bit", "lowrank-3"]), family=st.sampled_from(FAMILIES),
       dtype=st.sampled_from(DTYPES), n=st.integers(1, 33), c=st.integers(1, 41), seed=st.integers(0, 2**16))
def test_hostile_values_decode_finite_and_as_documented(name, family, dtype, n, c, seed):
    x = hostile(family, n, c, dtype, seed)
    codec = codecs.get(name)
    p = codec.encode(x)
    assert p.nbytes == codec.payload_nbytes((n, c), dtype)
    y = codec.decode(p)
    assert y.shape == x.shape and y.dtype == dtype
    assert torch.isfinite(y.float()).all()
    if family == "zeros":
        assert not y.float().any()
    expect = reference(name, x)
    if expect is not None:
        assert torch.equal(y.view(-1).view(torch.uint8), expect.view(-1).view(torch.uint8)) or torch.equal(y, expect)
    else:  # lowrank: a projection (never larger than x), exact up to rounding for rank <= R
        xf, yf = x.float(), y.float()
        eps = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
        norm = xf.norm().item()
        assert (xf - yf).norm().item() <= norm * (1 + 4 * eps) + 1e-30
        if family in ("zeros", "constant"):
            assert (xf - yf).norm().item() <= norm * 4 * eps + 1e-30


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(["int8", "int4", "int2", "1bit", "lowrank-3"]), family=st.sampled_from(FAMILIES),
       dtype=st.sampled_from(DTYPES), n=st.integers(1, 17), c=st.integers(1, 23), seed=st.integers(0, 2**16))
def test_residual_caches_stay_equal_and_finite_on_hostile_sequences(name, family, dtype, n, c, seed):
    codec = codecs.get(name)
    sender = hostile(family, n, c, dtype, seed)  # seeded as after a raw warm-up step
    receiver = sender.clone()
    for step in range(4):
        x = hostile(family if step % 2 else "dynamic_range", n, c, dtype, seed + step + 1)
        p = codec.encode_residual(x, sender)
        codec.decode_residual(codec.unflatten(p.flatten(), (n, c), dtype), receiver)
        assert torch.equal(sender.view(torch.uint8), receiver.view(torch.uint8))
        assert torch.isfinite(receiver.float()).all()


# --------------------------------------------------------------------------------------------
# NaN/Inf on every exchange path, at a warm-up (seed) step and a coded step, residual and plain
# --------------------------------------------------------------------------------------------

POISON = {0: float("nan"), 2: float("inf")}  # step -> value rank 0 sends in every exchange


def poisoned_exchanges(rank: int, world: int, name: str) -> dict:
    """5 steps of a2a, all-gather, ring and p2p; at steps 0 (warm-up) and 2 (coded) rank 0's tensors
    hold NaN / Inf in every row. Returns per step: delivery as expected (step 0 raw, bit-exact;
    step 2 every row from rank 0 NaN-marked), non-finite cache entries, mismatches."""
    import torch.distributed as dist

    from compactfusion_xdit.core.cache_history import CacheHistory
    from compactfusion_xdit.comm import CompressedCommunicator
    from compactfusion_xdit.core.residual import ResidualState

    state = ResidualState(name)
    history = CacheHistory(state)
    comm = CompressedCommunicator(state)
    state.begin_request()
    out = {"steps": []}
    nxt, prv = (rank + 1) % world, (rank - 1) % world

    def tensors(r: int, step: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(10 * r)
        a, b = torch.randn(2 * world, 6, generator=g), torch.randn(2 * world, 6, generator=g)
        x = math.cos(0.2 * step) * a + math.sin(0.2 * step) * b
        if r == 0 and step in POISON:
            x[:, 1] = POISON[step]
        return x

    for step in range(5):
        state.set_step(step)
        x = tensors(rank, step)
        a2a = comm.all_to_all(("ulysses", 0, "qkv"), x)
        gathered = comm.all_gather(("patch", 0, "kv"), x)
        ring = dict(comm.ring_exchange(("ring", 0), (x,)))
        send = comm.isend(("pipefusion", "latent", 0), x, dst=nxt)
        p2p = comm.irecv(("pipefusion", "latent", 0), x.shape, x.dtype, src=prv).wait()
        send.wait()
        dist.barrier()
        from_0 = tensors(0, step)
        exact = lambda a, b: torch.equal(a.nan_to_num(7, 8, 9), b.nan_to_num(7, 8, 9))  # noqa: E731
        if step == 2:  # coded: every row held Inf, so every row arrives marked (NaN)
            exact = lambda a, b: bool(a.isnan().all())  # noqa: E731
        raw_ok = True
        if rank != 0:
            raw_ok = exact(a2a[:2], from_0[2 * rank:2 * rank + 2]) and exact(gathered[0], from_0) and exact(ring[0][0], from_0)
            if prv == 0:
                raw_ok = raw_ok and exact(p2p, from_0)
        bad_caches = [repr(k) for (side, k) in history.entries
                      if (t := state.cache(side, k)) is not None and not torch.isfinite(t.float()).all()]
        out["steps"].append({"raw_ok": raw_ok, "bad_caches": bad_caches, "mismatches": comm.cache_mismatches(),
                             "finite_out": bool(torch.isfinite(a2a[:2] if rank == 0 else a2a[2:]).all())})
    out["history"] = history.mismatches()
    out["stats"] = state.stats()
    return out


POISON_CODECS = ["residual-int4", "residual-1bit", "int8"]


def poisoned_exchanges_per_codec(rank: int, world: int) -> dict:
    return {name: poisoned_exchanges(rank, world, name) for name in POISON_CODECS}


@pytest.fixture(scope="module")
def poisoned():
    """One 3-rank launch for every codec."""
    return run_ranks(f"{HERE}:poisoned_exchanges_per_codec", 3, timeout=180)


@pytest.mark.parametrize("name", POISON_CODECS)
def test_nan_and_inf_never_enter_a_cache_on_any_path(poisoned, name):
    results = [per_codec[name] for per_codec in poisoned]
    for rank, r in enumerate(results):
        for step, s in enumerate(r["steps"]):
            assert s["bad_caches"] == [] and s["mismatches"] == [], (rank, step, s)
            if step in POISON:
                assert s["raw_ok"], (rank, step)  # step 0 raw, bit-exact; step 2 marked rows
        assert r["history"] == []
    s0 = results[0]["stats"]
    # step 2 is coded: 2 rows to each of 2 peers (a2a), 6 rows each for gather, ring and p2p, all
    # marked in band; nothing re-seeds (the warm-up step cached its NaN rows as zeros)
    assert s0["nonfinite_rows"] == 2 * 2 + 3 * 6 and s0["reseeds"] == 0, s0
