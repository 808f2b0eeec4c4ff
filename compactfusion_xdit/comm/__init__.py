"""Compressed communicator: collectives over torch.distributed that carry residual-coded payloads.

    from compactfusion_xdit.comm import CompressedCommunicator
    comm = CompressedCommunicator(ResidualState(CompressionConfig.parse("residual-int4")), group)
    y = comm.all_to_all(("ulysses", layer, "qkv"), x)
"""

from compactfusion_xdit.comm.communicator import CompressedCommunicator
from compactfusion_xdit.comm.wire import link_key
from compactfusion_xdit.comm.pending import Pending
from compactfusion_xdit.comm.ring_exchange import RingExchange

__all__ = ["CompressedCommunicator", "Pending", "RingExchange", "link_key"]
