"""A torchrun rank for test_two_nodes.py: start the liveness responder as the ``xfuser`` ranks do,
then try to reach it on the group's address and on another address of this node.

    python -m torch.distributed.run ... tests/paths/_two_nodes_probe.py OTHER_ADDRESS OUT_DIR
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import torch.distributed as dist

from compactfusion_xdit.reliability import liveness


def reaches(address: str, port: int) -> bool:
    try:
        with socket.create_connection((address, port), timeout=5) as conn:
            return conn.recv(1) == b"\x01"
    except OSError:
        return False


def main() -> None:
    other, out_dir = sys.argv[1], sys.argv[2]
    liveness.init_process_group("gloo")
    peers = liveness.start_liveness()
    address, port = peers.addresses[dist.get_rank()]
    result = {"rank": dist.get_rank(), "address": address, "port": port,
              "on_group_address": reaches(address, port), "on_other_address": reaches(other, port),
              "peers_alive": peers.lost_ranks() == [],
              # what listens in this node's namespace (for docs/reliability.md's port table)
              "listening": subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout.splitlines()}
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"probe{dist.get_rank()}.json"), "w") as f:
        json.dump(result, f)
    dist.barrier()
    liveness.stop_liveness()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
