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
    from compactfusion_xdit.config import CompressionConfig

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
    from compactfusion_xdit.config import CompressionConfig

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
                expected_sent += (world - 1) * (raw if step == 0 else rows * (cols // 2) + 2 * rows + 1)
        legacy = rank["stats"]["paths"]["legacy"]
        assert legacy["raw_bytes"] == expected_raw and legacy["sent_bytes"] == expected_sent
        assert set(rank["stats"]["paths"]) == {"legacy"}


def test_legacy_path_off_leaves_the_exchange_stock(residual_int4):
    assert all(rank["off_is_stock"] for rank in residual_int4)
