"""Point-to-point posting shared by the communicator: one `batch_isend_irecv` per call, with CUDA
tensors on a gloo group staged through host memory (gloo's send/recv of CUDA tensors fails,
while its collectives accept them)."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

from compactfusion_xdit.comm.pending import Pending

#: (tensor, peer global rank, tag)
Transfer = tuple[torch.Tensor, int, int]


def stages_on_host(group: dist.ProcessGroup, device: torch.device) -> bool:
    return device.type != "cpu" and dist.get_backend(group) == "gloo"


def post(group: dist.ProcessGroup, sends: Sequence[Transfer] = (), recvs: Sequence[Transfer] = ()) -> tuple[Pending, Pending]:
    """Post the sends and receives together; return (sends done, receives done) handles.

    Received data is in the given tensors once the receive handle's ``wait()`` returns."""
    ops, copies = [], []
    for t, peer, tag in sends:
        if stages_on_host(group, t.device):
            t = t.to("cpu")
        ops.append(dist.P2POp(dist.isend, t, peer, group, tag))
    for t, peer, tag in recvs:
        target = t
        if stages_on_host(group, t.device):
            target = torch.empty(t.shape, dtype=t.dtype)
            copies.append((t, target))
        ops.append(dist.P2POp(dist.irecv, target, peer, group, tag))
    works = dist.batch_isend_irecv(ops) if ops else []

    def copy_back() -> None:
        for t, host in copies:
            t.copy_(host)

    n = len(sends)
    return Pending(works[:n], keep=ops[:n]), Pending(works[n:], copy_back, keep=ops[n:])
