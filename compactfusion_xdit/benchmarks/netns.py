"""Emulated links: one network namespace per rank, a star of veth links through a hub bridge,
each link shaped with ``tc`` (both directions) to a given rate. Linux, root, ``ip`` and ``tc``.

    with Star(ranks=4) as star:             # namespaces cfxb-<tag>-r0..r3 plus cfxb-<tag>-hub
        star.shape("1gbit")                 # every rank's up- and downlink at 1 Gbit/s ("unshaped": none)
        star.rank_command(0, ["python", ...])   # -> ["ip", "netns", "exec", ns, ...]
    # on exit (also on an exception) every namespace, link and qdisc it made is gone

Rank i has address 10.<net>.0.<i+1>/24 on interface ``star.ifname(i)``: point ``MASTER_ADDR`` at
rank 0's address and ``GLOO_SOCKET_IFNAME`` at the interface, and traffic between ranks crosses the
shaped links only (each namespace has just loopback and its link). `cleanup_leftovers` removes what
a killed run left (every namespace and root-namespace link carrying this module's prefix). While a
star exists, a reaper process (``python -m compactfusion_xdit.benchmarks.netns reap PID TAG``, started
by `Star.create`) removes it, and the processes inside, should the process that made it die without
cleaning up (``kill -9``); a clean `destroy` stops the reaper first.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time

NS_PREFIX = "cfxb-"
LINK_PREFIX = "cfx"
_LINK_RE = re.compile(r"^cfx[0-9a-f]{5}[hr]\d+$")


class NetnsUnavailable(RuntimeError):
    """Namespaces cannot be made here (not root, no ``ip``/``tc``, or the kernel refuses)."""


def _run(cmd: list[str], check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def unavailable_reason() -> str | None:
    """Why emulated links cannot run here, or None when they can (probes a namespace once)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "needs root (network namespaces and tc); run it as root, e.g. with sudo"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"needs the '{tool}' command (iproute2); install iproute2"
    probe = f"{NS_PREFIX}probe{os.getpid()}"
    made = _run(["ip", "netns", "add", probe], check=False)
    if made.returncode != 0:
        return f"cannot create a network namespace here ({made.stderr.strip()})"
    _run(["ip", "netns", "del", probe], check=False)
    return None


def parse_rate(rate: str) -> int | None:
    """'100mbit' / '1gbit' / '10gbit' / '500kbit' -> bits per second; 'unshaped' -> None."""
    text = rate.strip().lower()
    if text == "unshaped":
        return None
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(k|m|g)bit", text)
    if not m:
        raise ValueError(f"rate {rate!r}: write e.g. 100mbit, 1gbit, 10gbit or unshaped")
    return int(float(m.group(1)) * {"k": 1e3, "m": 1e6, "g": 1e9}[m.group(2)])


def list_namespaces() -> list[str]:
    out = _run(["ip", "netns", "list"], check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def list_root_links() -> list[str]:
    out = _run(["ip", "-o", "link", "show"], check=False).stdout
    names = []
    for line in out.splitlines():
        parts = line.split(":")
        if len(parts) > 1:
            names.append(parts[1].strip().split("@")[0])
    return names


def leftovers(tag: str | None = None) -> dict[str, list[str]]:
    """Namespaces and root-namespace links with this module's names (of one run's `tag`, or all)."""
    ns_prefix = NS_PREFIX + (f"{tag}-" if tag else "")
    return {"namespaces": [n for n in list_namespaces() if n.startswith(ns_prefix)],
            "links": [n for n in list_root_links() if _LINK_RE.match(n) and (tag is None or n[3:8] == tag)]}


def cleanup_leftovers(tag: str | None = None) -> dict[str, list[str]]:
    """Remove what a killed run left: its `tag`'s namespaces and links, or (None) every one this
    module could have made, including a running benchmark's; returns what was removed."""
    found = leftovers(tag)
    for ns in found["namespaces"]:
        _kill_namespace_processes(ns)
        _run(["ip", "netns", "del", ns], check=False)
    for link in found["links"]:
        _run(["ip", "link", "del", link], check=False)
    return found


def _kill_namespace_processes(ns: str) -> None:
    pids = _run(["ip", "netns", "pids", ns], check=False).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), 9)
        except (ProcessLookupError, ValueError):
            pass


class Star:
    """Rank namespaces joined through a bridge in a hub namespace; see the module docstring."""

    def __init__(self, ranks: int, tag: str | None = None, net: int = 77) -> None:
        self.ranks = ranks
        self.tag = tag or f"{os.getpid() % 0xFFFFF:05x}"
        if not re.fullmatch(r"[0-9a-f]{5}", self.tag):
            raise ValueError(f"tag {self.tag!r}: use 5 hex digits (interface names are limited to 15 characters)")
        self.net = net
        self.hub = f"{NS_PREFIX}{self.tag}-hub"
        self.namespaces = [f"{NS_PREFIX}{self.tag}-r{i}" for i in range(ranks)]
        self._made_ns: list[str] = []
        self._made_links: list[str] = []
        self._reaper: subprocess.Popen | None = None
        self.rate: str = "unshaped"

    # names ----------------------------------------------------------------------------------
    def ifname(self, rank: int) -> str:
        """The rank's interface (inside its namespace)."""
        return f"{LINK_PREFIX}{self.tag}r{rank}"

    def hub_ifname(self, rank: int) -> str:
        return f"{LINK_PREFIX}{self.tag}h{rank}"

    def address(self, rank: int) -> str:
        return f"10.{self.net}.0.{rank + 1}"

    def rank_command(self, rank: int, cmd: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.namespaces[rank], *cmd]

    # lifecycle ------------------------------------------------------------------------------
    def __enter__(self) -> "Star":
        try:
            self.create()
        except BaseException:
            self.destroy()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.destroy()

    def _add_ns(self, ns: str) -> None:
        _run(["ip", "netns", "add", ns])
        self._made_ns.append(ns)
        _run(["ip", "-n", ns, "link", "set", "lo", "up"])

    def create(self) -> None:
        cleanup_leftovers(self.tag)  # a killed earlier run with this tag would block every name below
        self._reaper = subprocess.Popen([sys.executable, "-m", __name__, "reap", str(os.getpid()), self.tag],
                                        stdin=subprocess.DEVNULL, start_new_session=True)
        self._add_ns(self.hub)
        _run(["ip", "-n", self.hub, "link", "add", "br0", "type", "bridge"])
        _run(["ip", "-n", self.hub, "link", "set", "br0", "up"])
        for rank, ns in enumerate(self.namespaces):
            self._add_ns(ns)
            rank_if, hub_if = self.ifname(rank), self.hub_ifname(rank)
            _run(["ip", "link", "add", rank_if, "type", "veth", "peer", "name", hub_if])
            self._made_links.append(rank_if)
            _run(["ip", "link", "set", rank_if, "netns", ns])
            _run(["ip", "link", "set", hub_if, "netns", self.hub])
            _run(["ip", "-n", ns, "addr", "add", f"{self.address(rank)}/24", "dev", rank_if])
            _run(["ip", "-n", ns, "link", "set", rank_if, "up"])
            _run(["ip", "-n", self.hub, "link", "set", hub_if, "master", "br0"])
            _run(["ip", "-n", self.hub, "link", "set", hub_if, "up"])

    def _links(self):
        for rank, ns in enumerate(self.namespaces):
            yield ns, self.ifname(rank)
            yield self.hub, self.hub_ifname(rank)

    def shape(self, rate: str) -> None:
        """Every link, both directions, at `rate` (tbf); 'unshaped' removes the qdiscs."""
        bits = parse_rate(rate)
        for ns, dev in self._links():
            _run(["ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", dev, "root"], check=False)
            if bits is None:
                continue
            rate_bytes = bits / 8
            # burst: 125 us of traffic, at least 4 KiB (tbf splits larger GSO packets itself). A
            # wire serialises every byte at the rate; a bucket of milliseconds would pass a model's
            # small per-layer messages for free (measured: 100 KB in 0.5 ms at 100 Mbit with a
            # 128 KiB bucket, 8.8 ms with 3 KB). Below ~16 KiB the qdisc's timer adds ~0.5 ms per
            # message at 1 Gbit, hence the time floor. Queue: 100 ms at the rate, deep enough that
            # TCP is paced by the bucket rather than by drops.
            burst = max(4096, int(rate_bytes * 125e-6))
            limit = max(4 * burst, int(rate_bytes * 0.1))
            _run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", str(bits),
                  "burst", str(burst), "limit", str(limit)])
        self.rate = rate

    def qdiscs(self) -> list[str]:
        """``tc qdisc show`` lines of every link (for checks)."""
        lines = []
        for ns, dev in self._links():
            lines += _run(["ip", "netns", "exec", ns, "tc", "qdisc", "show", "dev", dev], check=False).stdout.splitlines()
        return lines

    def destroy(self) -> None:
        """Remove every namespace and link made (idempotent); processes left inside are killed."""
        if self._reaper is not None:  # we clean up ourselves: the reaper must not touch a later star
            self._reaper.kill()
            self._reaper.wait()
            self._reaper = None
        for ns in reversed(self._made_ns):
            _kill_namespace_processes(ns)
            _run(["ip", "netns", "del", ns], check=False)
        self._made_ns.clear()
        roots = set(list_root_links())
        for link in self._made_links:  # a veth still in the root namespace (creation failed midway)
            for name in (link, link.replace(f"{self.tag}r", f"{self.tag}h")):
                if name in roots:
                    _run(["ip", "link", "del", name], check=False)
        self._made_links.clear()


def reap(parent: int, tag: str, poll_s: float = 0.2) -> None:
    """The reaper: once `parent` (the process that made `tag`'s star) has died, remove that star
    and kill the processes inside it. A dead parent re-parents this process at once, zombie or not."""
    while os.getppid() == parent:
        time.sleep(poll_s)
    cleanup_leftovers(tag)


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "reap":
        sys.exit("usage: python -m compactfusion_xdit.benchmarks.netns reap PARENT_PID TAG")
    reap(int(sys.argv[2]), sys.argv[3])
