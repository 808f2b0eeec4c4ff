"""The plugin's listener (the liveness responder) binds only to the interface the process group
uses, never to every interface. The two-namespace check (a second interface of a node refuses) is
tests/paths/test_two_nodes.py (root, slow); here the same property on loopback addresses."""

from __future__ import annotations

import socket

from compactfusion_xdit.core.scope import interface_address
from compactfusion_xdit.reliability import liveness


def test_interface_address_follows_the_group_interface(monkeypatch):
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    assert interface_address() == "127.0.0.1"
    monkeypatch.delenv("GLOO_SOCKET_IFNAME")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    assert interface_address() == "127.0.0.1"  # the source address of the route to the rendezvous


def test_the_responder_answers_only_on_its_address(monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    responder = liveness.Responder()
    try:
        assert responder.address == "127.0.0.1"
        with socket.create_connection(("127.0.0.1", responder.port), timeout=5) as conn:
            assert conn.recv(1) == b"\x01"
        try:  # another local address of this host: nothing listens there
            socket.create_connection(("127.0.0.2", responder.port), timeout=5).close()
            reached = True
        except OSError:
            reached = False
        assert not reached
    finally:
        responder.close()


def test_the_launcher_names_lost_peers_from_the_published_table(tmp_path, monkeypatch):
    """Where a rank could not name its lost peers (NCCL's watchdog aborts it first), the launcher
    probes the table the node's local rank 0 published (``CFX_PEERS_FILE``), skipping its own ranks."""
    from compactfusion_xdit.cli import torchrun

    path = str(tmp_path / "peers.json")
    monkeypatch.setenv("CFX_PEERS_FILE", path)
    monkeypatch.setenv("LOCAL_RANK", "0")
    alive, gone = liveness.Responder("127.0.0.1"), liveness.Responder("127.0.0.1")
    gone.close()
    try:
        table = [("127.0.0.1", gone.port), ("127.0.0.1", gone.port), ("127.0.0.1", alive.port), ("127.0.0.1", gone.port)]
        liveness._publish(table)
        local = torchrun._local_ranks(["torchrun", "--nproc_per_node=2", "--node_rank=0", "-m", "w"])
        assert local == range(0, 2)
        assert liveness.lost_in_file(path, local, timeout_s=5.0) == [3]
        assert liveness.lost_in_file(str(tmp_path / "missing.json"), local) == []
    finally:
        alive.close()
