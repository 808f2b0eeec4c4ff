"""The legacy yunchang exchange (``SeqAllToAll4D``) through the compressed communicator, at the
function level on 2 CPU ranks (gloo).

The legacy model path (Sana, StepVideo via ``xFuserLongContextAttention``) does not run here:
Sana's processor asks yunchang 0.6.4 for ``AttnType.TORCH``, which it does not define, and flash-attn
is absent. So the test drives ``SeqAllToAll4D.apply`` itself, as ``xFuserLongContextAttention.forward``
does (q, k, v with scatter 2 / gather 1, then the output with scatter 1 / gather 2), over 3 steps of
slowly changing tensors, and compares with the stock exchange in the same process.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from compactfusion_xdit.testing import run_ranks

HERE = os.path.abspath(__file__)
STEPS = 3
SHAPE = (1, 8, 4, 16)  # (b, s/P, h, d) on each rank


def exchange_steps(rank: int, world_size: int, session) -> list[list[torch.Tensor]]:
    """Per step: q, k, v (sequence-sharded -> head-sharded) then an output back, like
    xFuserLongContextAttention.forward. Inputs drift a little each step."""
    import torch.distributed as dist
    from yunchang.comm.all_to_all import SeqAllToAll4D

    gen = torch.Generator().manual_seed(100 + rank)
    base = [torch.randn(SHAPE, generator=gen) for _ in range(3)]
    drift = [torch.randn(SHAPE, generator=gen) for _ in range(3)]
    out_shape = (SHAPE[0], SHAPE[1] * world_size, SHAPE[2] // world_size, SHAPE[3])
    out_base, out_drift = torch.randn(out_shape, generator=gen), torch.randn(out_shape, generator=gen)
    group = dist.group.WORLD
    if session is not None:
        session.begin_request()
    steps = []
    for step in range(STEPS):
        if session is not None:
            session.set_step(step)
        q, k, v = (b + 0.05 * step * d for b, d in zip(base, drift))
        got = [SeqAllToAll4D.apply(group, t, 2, 1) for t in (q, k, v)]
        got.append(SeqAllToAll4D.apply(group, out_base + 0.05 * step * out_drift, 1, 2))
        steps.append(got)
    return steps


def legacy_target(rank: int, world_size: int, compression: str):
    from compactfusion_xdit import patches
    from compactfusion_xdit.comm import communicator
    from compactfusion_xdit.core.config import CompressionConfig

    patches.install()  # stock yunchang exchange (CPU/gloo support only)
    stock = exchange_steps(rank, world_size, None)
    patches.install(CompressionConfig.parse(compression))
    session = patches.session()
    keys = []
    all_to_all = communicator.CompressedCommunicator.all_to_all

    def recording(self, key, x, group=None, async_op=False):
        keys.append((key, tuple(x.shape)))
        return all_to_all(self, key, x, group, async_op)

    communicator.CompressedCommunicator.all_to_all = recording
    coded = exchange_steps(rank, world_size, session)
    communicator.CompressedCommunicator.all_to_all = all_to_all
    result = {"stock": stock, "coded": coded, "keys": keys, "stats": session.stats(),
              "mismatches": session.check_caches(None), "off_is_stock": legacy_off(rank, world_size, stock)}
    patches.uninstall()
    return result


def legacy_off(rank: int, world_size: int, stock) -> bool:
    """residual-int4 on the Ulysses path only: yunchang's module is untouched and results are stock."""
    import yunchang.comm.all_to_all as a2a

    from compactfusion_xdit import patches
    from compactfusion_xdit.core.config import CompressionConfig

    patches.install(CompressionConfig.parse("residual-int4", paths="ulysses"))
    untouched = a2a.dist is torch.distributed and a2a.all_to_all_4D.__module__ == "yunchang.comm.all_to_all"
    again = exchange_steps(rank, world_size, patches.session())
    return untouched and all(torch.equal(a, b) for sa, sb in zip(stock, again) for a, b in zip(sa, sb))


@pytest.fixture(scope="module")
def residual_int4():
    return run_ranks(f"{HERE}:legacy_target", 2, {"compression": "residual-int4"}, timeout=120)


def test_warmup_step_is_bitwise_stock_and_coded_steps_are_close(residual_int4):
    for rank in residual_int4:
        for step, (stock, coded) in enumerate(zip(rank["stock"], rank["coded"])):
            for s, c in zip(stock, coded):
                assert s.shape == c.shape
                if step == 0:
                    assert torch.equal(s, c)
                else:
                    # int4 of the step residual (|r| ~ 0.07): error <= scale / 2 per element; the own
                    # chunk (half of the result) stays exact
                    assert not torch.equal(s, c)
                    assert (s - c).abs().max().item() < 0.02


def test_keys_are_legacy_layer_role_and_caches_stay_consistent(residual_int4):
    for rank in residual_int4:
        keys = [k for k, _ in rank["keys"]]
        assert keys == [("legacy", 0, role) for role in ("q", "k", "v", "out")] * STEPS
        assert rank["mismatches"] == []


def test_legacy_bytes_equal_the_codec_payload_arithmetic(residual_int4):
    for rank in residual_int4:
        expected_raw = expected_sent = 0
        for step in range(STEPS):
            for _, shape in rank["keys"][4 * step:4 * step + 4]:
                world = shape[0]
                rows, cols = math.prod(shape[1:-1]), shape[-1]
                raw = rows * cols * 4
                expected_raw += (world - 1) * raw
                expected_sent += (world - 1) * (raw if step == 0 else rows * (cols // 2) + 2 * rows)
        legacy = rank["stats"]["paths"]["legacy"]
        assert legacy["raw_bytes"] == expected_raw and legacy["sent_bytes"] == expected_sent
        assert set(rank["stats"]["paths"]) == {"legacy"}


def test_legacy_path_off_leaves_the_exchange_stock(residual_int4):
    assert all(rank["off_is_stock"] for rank in residual_int4)


# --- yunchang's ring (RingComm) -------------------------------------------------------------------

RING_SHAPE = (1, 8, 2, 16)  # (b, s/P, h, d) on each rank
RING_WORLD = 3  # three hops: payloads are forwarded, not only sent once


def cpu_attention_with_lse(q, k, v, dropout_p=0.0, softmax_scale=None, causal=True, **_):
    """yunchang's pytorch_attn_forward calls a CUDA-only aten kernel; this is its CPU twin."""
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p, causal, scale=softmax_scale)[:2]
    return out.transpose(1, 2), lse


def ring_steps(rank: int, session) -> list[torch.Tensor]:
    """yunchang's ring attention over STEPS steps of slowly drifting q, k, v; outputs per step."""
    import torch.distributed as dist
    from yunchang.ring import ring_pytorch_attn

    ring_pytorch_attn.pytorch_attn_forward = cpu_attention_with_lse
    gen = torch.Generator().manual_seed(200 + rank)
    base = [torch.randn(RING_SHAPE, generator=gen) for _ in range(3)]
    drift = [torch.randn(RING_SHAPE, generator=gen) for _ in range(3)]
    if session is not None:
        session.begin_request()
    outs = []
    for step in range(STEPS):
        if session is not None:
            session.set_step(step)
        q, k, v = (b + 0.05 * step * d for b, d in zip(base, drift))
        outs.append(ring_pytorch_attn.ring_pytorch_attn_func(q, k, v, causal=False, group=dist.group.WORLD))
    return outs


def ring_target(rank: int, world_size: int, compression: str, warmup: int = 1):
    from compactfusion_xdit import patches
    from compactfusion_xdit.core.config import CompressionConfig
    from yunchang.ring import ring_pytorch_attn

    patches.install()
    stock = ring_steps(rank, None)
    stock_class = type(ring_pytorch_attn.RingComm(None))
    patches.install(CompressionConfig.parse(compression, warmup=warmup))
    session = patches.session()
    coded = ring_steps(rank, session)
    result = {"stock": stock, "coded": coded, "stats": session.stats(), "stock_class": stock_class.__name__,
              "patched_class": type(ring_pytorch_attn.RingComm(None)).__name__,
              "mismatches": session.check_caches(None)}
    patches.uninstall()
    result["restored"] = type(ring_pytorch_attn.RingComm(None)).__name__
    return result


@pytest.fixture(scope="module")
def ring_int4():
    return run_ranks(f"{HERE}:ring_target", RING_WORLD, {"compression": "residual-int4"}, timeout=120)


def test_ring_comm_replaced_and_restored(ring_int4):
    for rank in ring_int4:
        assert rank["stock_class"] == "RingComm"
        assert rank["patched_class"] == "CompressedRingComm"
        assert rank["restored"] == "RingComm"


def test_ring_warmup_step_is_bitwise_stock_and_coded_steps_are_close(ring_int4):
    for rank in ring_int4:
        for step, (stock, coded) in enumerate(zip(rank["stock"], rank["coded"])):
            if step == 0:
                assert torch.equal(stock, coded)
            else:
                assert not torch.equal(stock, coded)
                # int4 of k/v residuals of size ~0.05 * step: attention output moves by less than that
                assert (stock - coded).abs().max().item() < 0.02


def test_ring_bytes_equal_the_codec_payload_arithmetic_and_caches_agree(ring_int4):
    rows, cols = math.prod(RING_SHAPE[:-1]), RING_SHAPE[-1]
    raw = rows * cols * 4
    coded = rows * (cols // 2) + 2 * rows
    hops = RING_WORLD - 1  # every rank's own k and v travel world - 1 hops
    for rank in ring_int4:
        legacy = rank["stats"]["paths"]["legacy"]
        assert legacy["raw_bytes"] == STEPS * hops * 2 * raw
        assert legacy["sent_bytes"] == hops * 2 * (raw + (STEPS - 1) * coded)
        assert rank["mismatches"] == []


@pytest.mark.slow  # CI time; the warm-up-step test checks raw legacy bytes are stock
def test_ring_with_every_message_raw_is_bitwise_stock():
    for rank in run_ranks(f"{HERE}:ring_target", RING_WORLD,
                          {"compression": "residual-int4", "warmup": 10**6}, timeout=120):
        assert all(torch.equal(s, c) for s, c in zip(rank["stock"], rank["coded"]))
        assert rank["stats"]["paths"]["legacy"]["raw_bytes"] == rank["stats"]["paths"]["legacy"]["sent_bytes"]
