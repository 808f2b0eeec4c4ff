"""Checks that only mean something on a GPU, for ``scripts/gpu_check.py``.

    run_ranks("compactfusion_xdit.benchmarks.gpu_checks:sync_free_exchange", 2, {"device": "cuda"})

`sync_free_exchange`: two processes share one GPU over gloo (NCCL refuses two ranks on one
device); each step runs stock ``all_to_all_single`` and then the compressed all-to-all on the same
CUDA tensor under ``torch.cuda.set_sync_debug_mode("error")``, and records which of them made the
host wait for the device (the first error line) and what kind of message each coded step was.
Stock's line is the control: gloo itself may synchronise when it stages CUDA tensors.
"""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def _sync_errors(device: str, into: dict, name: str):
    """Turn host synchronisations into errors while the block runs (CUDA only); record the first."""
    import torch

    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        yield
        into[name] = None
    except RuntimeError as err:
        into[name] = str(err).strip().splitlines()[0][:300]
    finally:
        if cuda:
            torch.cuda.set_sync_debug_mode(0)


def sync_free_exchange(rank: int, world_size: int, device: str = "cuda", codec: str = "residual-int4",
                       steps: int = 4, tokens: int = 1024, channels: int = 3072) -> list[dict]:
    """Per step: the message kind and the first host-sync error (None: none) of stock and compressed."""
    import math

    import torch
    import torch.distributed as dist

    from compactfusion_xdit.comm import CompressedCommunicator
    from compactfusion_xdit.core.config import CompressionConfig
    from compactfusion_xdit.core.residual import ResidualState

    dev = torch.device(device, 0) if device.startswith("cuda") else torch.device(device)
    comm = CompressedCommunicator(ResidualState(CompressionConfig.parse(codec, warmup=1)))
    g = torch.Generator().manual_seed(rank)
    a, b = torch.randn(world_size * tokens, channels, generator=g), torch.randn(world_size * tokens, channels, generator=g)
    key = ("ulysses", 0, "qkv")
    out = []
    for step in range(steps):
        x = (math.cos(0.2 * step) * a + math.sin(0.2 * step) * b).to(dev, torch.float16)
        comm.state.set_step(step)
        record = {"step": step, "kind": comm.state.message_kind(key, (tokens, channels), x.dtype).name}
        stock = torch.empty_like(x)
        with _sync_errors(device, record, "stock_sync"):
            dist.all_to_all_single(stock, x)
        with _sync_errors(device, record, "compressed_sync"):
            comm.all_to_all(key, x)
        out.append(record)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return out
