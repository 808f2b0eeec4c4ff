"""One coded exchange is one collective (or one message per hop) and reads nothing back to the
host, on every operation of the communicator, counted in one process over `testing.loopback`
(every peer mirrors this rank). Host reads (`item`, `tolist`, `bool(tensor)`, ...) are what would
stall a CUDA stream; the same code runs there. Also the steady state after a NaN step."""

from __future__ import annotations

import pytest
import torch

from compactfusion_xdit.comm import CompressedCommunicator
from compactfusion_xdit.core.residual import ResidualState
from compactfusion_xdit.testing.loopback import loopback

CODECS = ["residual-int4", "residual-1bit", "int8"]


@pytest.fixture(params=["torch", pytest.param("compiled", marks=pytest.mark.slow)])
def codec_path(request, monkeypatch):
    """The torch reference codecs, and (slow: a cold numba cache builds for a minute) the
    compiled CPU kernels, the default outside the test suite."""
    if request.param == "torch":
        monkeypatch.setenv("CFX_CPU_KERNELS", "0")
        return None
    from compactfusion_xdit.codecs import cpu

    monkeypatch.delenv("CFX_CPU_KERNELS", raising=False)
    if not cpu.ensure_compiled(timeout=600):
        pytest.skip(f"compiled CPU codecs unavailable: {cpu.status()}")
    return cpu


def exchanges(comm, group, step: int, nan: bool = False) -> None:
    g = torch.Generator().manual_seed(step)
    x = torch.randn(4 * 6, 8, generator=g)
    if nan:
        x[0, 0] = float("nan")
    comm.all_to_all_many([("ulysses", 0, r) for r in "qkv"], [x, x * 2, x * 3], group=group)
    comm.all_gather(("patch", 0, "kv"), x[:6], group=group)
    for _ in comm.ring_exchange(("ring", 0), (x[:6], x[6:12]), group=group):
        pass
    comm.isend(("pipefusion", "latent", 0), x[:6], dst=1, group=group).wait()
    comm.irecv(("pipefusion", "latent", 0), (6, 8), torch.float32, src=1, group=group).wait()
    comm.broadcast(("step", "latents"), x[:6].clone(), src=0, group=group)


#: per step and operation, in the order of `exchanges`: 1 all-to-all, 1 all-gather, world - 1
#: ring hops, 1 send, 1 receive, 1 broadcast
def expected_calls(world: int) -> dict[str, int]:
    return {"all_to_all_single": 1, "all_gather_into_tensor": 1, "batch_isend_irecv": (world - 1) + 2, "broadcast": 1}


@pytest.mark.parametrize("name", CODECS)
@pytest.mark.parametrize("world", [2, 4])
def test_a_coded_step_is_one_collective_per_exchange_and_no_host_read(name, world, codec_path):
    state = ResidualState(name)
    comm = CompressedCommunicator(state)
    with loopback(world, 0) as counts:
        state.begin_request()
        for step in range(5):
            state.set_step(step)
            counts.reset()
            exchanges(comm, counts.group, step, nan=step == 2)
            assert counts.calls == expected_calls(world), (step, counts.calls)
            if step >= 1:  # coded steps, the NaN step included (its row travels marked in band)
                assert counts.host_syncs == 0, step
    s = state.stats()
    assert s["coded_messages"] > 0 and s["reseeds"] == 0
    assert s["nonfinite_rows"] > 0  # counted on the device, read here by stats()
    for t, _ in (*state._send.values(), *state._recv.values()):
        assert torch.isfinite(t).all()
