"""Bounded waits and lost-rank reports for a multi-rank run.

* `init_process_group(backend)`: the world group with a timeout (``CFX_COMM_TIMEOUT_S``, default
  `DEFAULT_TIMEOUT_S`), the same default for every group created later (xfuser's included), and
  NCCL's asynchronous error handling on, so no collective waits forever for a stuck peer.
* `start_liveness()`: every rank runs a tiny responder thread (one byte per TCP connection) and
  learns every other rank's address. When a collective fails (a dead peer closes its sockets:
  gloo fails at once; a frozen peer: the timeout), `lost_ranks_note()` probes the peers and names
  those that do not answer (a dead process refuses the connection, a frozen one never replies), so
  the error says which rank was lost, not only "connection closed". A peer whose main thread is
  stuck but whose process runs still answers: then only the timeout message remains.

    liveness.init_process_group("gloo")     # before xfuser initialises its groups
    liveness.start_liveness()             # collective
    ...
    except Exception as err: print(liveness.lost_ranks_note() + str(err))
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import threading

import torch.distributed as dist

from compactfusion_xdit import envs
from compactfusion_xdit.core.scope import interface_address

TIMEOUT_ENV = envs.COMM_TIMEOUT_S
DEFAULT_TIMEOUT_S = 600.0
#: A peer that does not answer a liveness probe within this many seconds is reported lost.
PROBE_TIMEOUT_S = 5.0


def timeout_seconds() -> float:
    """``CFX_COMM_TIMEOUT_S`` (seconds, > 0) or the default; a bad value is a ValueError naming it."""
    text = envs.get(TIMEOUT_ENV)
    if not text:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"{TIMEOUT_ENV}={text!r} must be a number of seconds > 0 (default {DEFAULT_TIMEOUT_S:g})")
    return value


def init_process_group(backend: str) -> bool:
    """Initialise the world group from the torchrun environment (RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT) with the bounded timeout, and make that timeout every later group's default.
    Returns False (and does nothing) when the group exists already or WORLD_SIZE is unset."""
    if dist.is_initialized() or "WORLD_SIZE" not in os.environ:
        return False
    from compactfusion_xdit.patches import _attrs, timeouts

    seconds = timeout_seconds()
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")  # a timed-out NCCL op ends the process
    timeouts.apply(_attrs.AttributePatcher(), seconds)  # for the life of the process
    if backend == "nccl":
        import torch

        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # before init: NCCL binds the device
    dist.init_process_group(backend, init_method="env://", timeout=datetime.timedelta(seconds=seconds))
    return True


class Responder:
    """A daemon thread answering one byte to every connection: this process is alive and not frozen.
    It listens on `address` only (default: the interface the process group uses,
    `core.scope.interface_address`), never on every interface of a multi-node cluster."""

    def __init__(self, address: str | None = None) -> None:
        self.address = address or interface_address()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind((self.address, 0))
        self._sock.listen(64)
        self.port = self._sock.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, name="cfx-liveness", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:  # closed
                return
            with conn:
                try:
                    conn.sendall(b"\x01")
                except OSError:
                    pass

    def close(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept(); close alone would not
        except OSError:
            pass
        self._sock.close()


def _answers(address: tuple[str, int], timeout_s: float) -> bool:
    try:
        with socket.create_connection(address, timeout=timeout_s) as conn:
            conn.settimeout(timeout_s)
            return conn.recv(1) == b"\x01"
    except OSError:
        return False


class Peers:
    """Every rank's responder address; `lost_ranks` probes them (a dead process refuses the
    connection, a frozen one never answers)."""

    def __init__(self, rank: int, addresses: list[tuple[str, int]], responder: Responder) -> None:
        self.rank = rank
        self.addresses = addresses
        self.responder = responder

    def lost_ranks(self, timeout_s: float = PROBE_TIMEOUT_S) -> list[int]:
        """Ranks other than this one that do not answer within `timeout_s` (probed in parallel)."""
        others = [r for r in range(len(self.addresses)) if r != self.rank]
        alive: dict[int, bool] = {}
        threads = [threading.Thread(target=lambda r=r: alive.__setitem__(r, _answers(self.addresses[r], timeout_s)),
                                    daemon=True) for r in others]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout_s * 2 + 1)
        return [r for r in others if not alive.get(r, False)]

    def close(self) -> None:
        self.responder.close()


_CURRENT: list[Peers] = []  # this process's peer table (at most one), for error reports


def start_liveness(group: dist.ProcessGroup | None = None) -> Peers | None:
    """Collective over the world: every rank starts its responder and learns the others'.
    None for a single process or without an initialised group."""
    if not dist.is_initialized() or dist.get_world_size() < 2:
        return None
    responder = Responder()
    addresses: list = [None] * dist.get_world_size()
    dist.all_gather_object(addresses, (responder.address, responder.port), group=group)
    peers = Peers(dist.get_rank(), [tuple(a) for a in addresses], responder)
    _publish(peers.addresses)
    stop_liveness()
    _CURRENT.append(peers)
    return peers


def _publish(addresses: list[tuple[str, int]]) -> None:
    """Local rank 0 writes the peer table where the launcher asked (``CFX_PEERS_FILE``), so the
    launcher can probe the peers itself when a rank ends without naming them (`lost_in_file`)."""
    path = envs.get(envs.PEERS_FILE)
    if path and os.environ.get("LOCAL_RANK", "0") == "0":
        try:
            with open(path + ".tmp", "w") as f:
                json.dump([list(a) for a in addresses], f)
            os.replace(path + ".tmp", path)
        except OSError:
            pass  # the launcher's note is optional


def lost_in_file(path: str, skip: range, timeout_s: float = PROBE_TIMEOUT_S) -> list[int]:
    """Ranks of the peer table at `path` (`_publish`), other than `skip` (this node's own ranks,
    which the launcher has stopped), that do not answer their probe; [] when there is no table."""
    try:
        with open(path) as f:
            addresses = [tuple(a) for a in json.load(f)]
    except (OSError, ValueError):
        return []
    probe = Peers(-1, addresses, None)
    return [r for r in probe.lost_ranks(timeout_s) if r not in skip]


def stop_liveness() -> None:
    while _CURRENT:
        _CURRENT.pop().close()


def lost_ranks_note() -> str:
    """``"rank 1 was lost (...); "`` when a peer does not answer its probe, else "" (waits at most
    about 2 x PROBE_TIMEOUT_S)."""
    if not _CURRENT:
        return ""
    lost = _CURRENT[-1].lost_ranks()
    if not lost:
        return ""
    names = ", ".join(map(str, lost))
    return (f"rank{'s' if len(lost) > 1 else ''} {names} {'were' if len(lost) > 1 else 'was'} lost "
            "(process died or stopped responding; see its log); ")
