"""Which links a run codes: ``--compression-scope all|inter-node``, and the host of every rank.

Nodes joined by Ethernet and fast links inside each node: coding pays on the links between nodes
and only costs time inside one. With scope ``inter-node`` an exchange is coded only when its ranks
sit on more than one host; an exchange inside one host goes raw (the stock bytes), never seeded
and never cached, so its caches are not even allocated. The unit is the exchange, because one
payload serves all of a collective's links (all-gather, broadcast, the ring's forwarded payload)
and an all-to-all is one collective: a point-to-point message is one link, a collective counts as
crossing when any two of its ranks sit on different hosts (then all its links are coded).

A rank's host is its `host_identity` (hostname + the address of the interface its process group
uses, or ``$CFX_HOST``); the session gathers every rank's once at start (one collective), so every
rank holds the same table and classifies every exchange alike, which keeps the caches in step.

    scope = LinkScope.from_identities("inter-node", ["a|10.0.0.1", "a|10.0.0.1", "b|10.0.0.2", "b|10.0.0.2"], me=0)
    scope.codes((0, 1))     # False: both on host 0, the exchange goes raw
    scope.codes((0, 2))     # True: crosses hosts
    scope.link_class(2)     # "inter-node": this rank (0) and rank 2 sit on different hosts
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct
from typing import Hashable, Sequence

from compactfusion_xdit import envs

SCOPES = ("all", "inter-node")
#: The two link classes stats are split into.
INTRA, INTER = "intra-node", "inter-node"
LINK_CLASSES = (INTRA, INTER)


def check_scope(scope: str) -> str:
    """`scope` when it is one of `SCOPES`; a ValueError naming the valid ones otherwise."""
    if scope not in SCOPES:
        raise ValueError(f"unknown compression scope {scope!r}; valid scopes: {', '.join(SCOPES)} "
                         "(inter-node: code only the links between nodes)")
    return scope


def _interface_address(ifname: str) -> str | None:
    """The IPv4 address of interface `ifname` (Linux ``SIOCGIFADDR``), None when it has none."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", ifname[:15].encode()))
        return socket.inet_ntoa(packed[20:24])
    except OSError:
        return None


def interface_address() -> str:
    """The address of the interface this process's group traffic uses: the first interface of
    ``GLOO_SOCKET_IFNAME`` / ``NCCL_SOCKET_IFNAME`` when set, else the source address of the route
    to ``MASTER_ADDR`` (no packet is sent); 127.0.0.1 when neither can be found."""
    for variable in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        names = [n for n in os.environ.get(variable, "").split(",") if n and not n.startswith(("^", "="))]
        if names:
            found = _interface_address(names[0])
            if found:
                return found
    master = os.environ.get("MASTER_ADDR", "127.0.0.1")
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((master, 9))
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"


def host_identity() -> str:
    """What names this rank's host: ``$CFX_HOST`` when set, else ``hostname|address`` (two network
    namespaces of one machine share the hostname but not the address)."""
    return envs.get(envs.HOST) or f"{socket.gethostname()}|{interface_address()}"


def host_indices(identities: Sequence[Hashable]) -> tuple[int, ...]:
    """Per rank, the index of its host in order of first appearance (the same on every rank that
    holds the same list)."""
    order: dict[Hashable, int] = {}
    return tuple(order.setdefault(identity, len(order)) for identity in identities)


class LinkScope:
    """The hosts of every global rank and the scope: which exchanges are coded, and each link's class."""

    def __init__(self, scope: str, hosts: Sequence[int], me: int) -> None:
        self.scope = check_scope(scope)
        self.hosts = tuple(hosts)
        self.me = me
        self._codes: dict[tuple[int, ...], bool] = {}
        self._classes: dict[tuple[int, ...], tuple[int, int]] = {}

    @classmethod
    def from_identities(cls, scope: str, identities: Sequence[Hashable], me: int) -> "LinkScope":
        return cls(scope, host_indices(identities), me)

    @property
    def nodes(self) -> int:
        return len(set(self.hosts))

    def crosses(self, ranks: Sequence[int]) -> bool:
        """Whether the global `ranks` of an exchange sit on more than one host."""
        first = self.hosts[ranks[0]]
        return any(self.hosts[r] != first for r in ranks)

    def codes(self, ranks: Sequence[int]) -> bool:
        """Whether an exchange among global `ranks` may be coded in this scope (memoised)."""
        key = tuple(ranks)
        found = self._codes.get(key)
        if found is None:
            found = self._codes[key] = self.scope == "all" or self.crosses(key)
        return found

    def link_class(self, peer: int) -> str:
        """`INTRA` when global rank `peer` sits on this rank's host, else `INTER`."""
        return INTRA if self.hosts[peer] == self.hosts[self.me] else INTER

    def split(self, peers: Sequence[int]) -> tuple[int, int]:
        """(intra-node, inter-node) counts of the global ranks `peers` (memoised)."""
        key = tuple(peers)
        found = self._classes.get(key)
        if found is None:
            inter = sum(self.hosts[p] != self.hosts[self.me] for p in key)
            found = self._classes[key] = (len(key) - inter, inter)
        return found
