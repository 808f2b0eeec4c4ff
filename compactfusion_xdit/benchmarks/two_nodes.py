"""Two hosts on one machine: two network namespaces ("nodes") joined by one link that ``tc`` shapes,
each running the ``xfuser`` command exactly as a user types it on its own host. Linux, root.

    with TwoNodes() as nodes:                       # namespaces cfxb-<tag>-r0 (node 0), -r1 (node 1)
        nodes.shape("100mbit")                      # the link between the nodes, both directions
        runs = nodes.run(["--model", "tiny-flux", "--ulysses_degree", "2", "--ring_degree", "2", ...])
        runs[0].returncode, runs[0].stderr          # per node; outputs under runs[i].output_dir
    # on exit (also on an exception) every process, namespace, link and qdisc made is gone

Node i has address ``address(i)`` on interface ``ifname(i)`` (`netns.Star` with one namespace per
node). Each node's command gets ``--nnodes 2 --node_rank i --master_addr <node 0> --master_port P``
and ``GLOO_SOCKET_IFNAME`` (what a user sets on a host with several interfaces), so torchrun places
ranks 2i, 2i+1 on node i. The ranks of one node reach each other on their own address, which never
leaves the namespace: only traffic between the nodes crosses the shaped link.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from compactfusion_xdit.benchmarks import netns

NODES = 2


def xfuser_command() -> list[str]:
    """The ``xfuser`` console script of this interpreter (``python -m`` the launcher where it is missing)."""
    script = os.path.join(os.path.dirname(sys.executable), "xfuser")
    return [script] if os.path.exists(script) else [sys.executable, "-m", "compactfusion_xdit.cli.launcher"]


@dataclasses.dataclass
class NodeRun:
    """One node's launch: its ``xfuser`` process, output folder and (once ended) exit status and output."""

    node: int
    proc: subprocess.Popen
    output_dir: str
    log_path: str
    returncode: int | None = None
    elapsed_s: float | None = None

    @property
    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()


class TwoNodes:
    """Two node namespaces and the launches in them; see the module docstring."""

    def __init__(self, tag: str | None = None, net: int = 78) -> None:
        self.star = netns.Star(NODES, tag=tag, net=net)
        self.workdir: str | None = None
        self.runs: list[NodeRun] = []

    def __enter__(self) -> "TwoNodes":
        self.workdir = tempfile.mkdtemp(prefix="cfx-two-nodes-")
        try:
            self.star.__enter__()
        except BaseException:
            shutil.rmtree(self.workdir, ignore_errors=True)
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.stop()
        finally:
            self.star.destroy()
            shutil.rmtree(self.workdir, ignore_errors=True)

    def address(self, node: int) -> str:
        return self.star.address(node)

    def ifname(self, node: int) -> str:
        return self.star.ifname(node)

    def namespace(self, node: int) -> str:
        return self.star.namespaces[node]

    def shape(self, rate: str) -> None:
        """The link between the nodes at `rate` (e.g. "100mbit"; "unshaped": no qdisc)."""
        self.star.shape(rate)

    def exec_command(self, node: int, cmd: list[str]) -> list[str]:
        return self.star.rank_command(node, cmd)

    def env(self, node: int, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env.update(GLOO_SOCKET_IFNAME=self.ifname(node), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                   TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1", **(extra or {}))
        env.pop("CUDA_VISIBLE_DEVICES", None)
        return env

    def node_argv(self, node: int, argv: list[str], port: int, output_dir: str) -> list[str]:
        """What a user types on node `node`: the run's flags plus the placement flags."""
        return [*xfuser_command(), *argv, "--nnodes", str(NODES), "--node_rank", str(node),
                "--master_addr", self.address(0), "--master_port", str(port), "--output_dir", output_dir]

    def start(self, argv: list[str], port: int = 29700, name: str = "run",
              env: dict[str, str] | None = None) -> list[NodeRun]:
        """Start the ``xfuser`` command on both nodes (node 1 first, as either order must work)."""
        runs = []
        for node in reversed(range(NODES)):
            out = os.path.join(self.workdir, f"{name}-node{node}")
            log_path = out + ".log"
            with open(log_path, "w") as log:
                proc = subprocess.Popen(self.exec_command(node, self.node_argv(node, argv, port, out)),
                                        env=self.env(node, env), stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
            runs.append(NodeRun(node, proc, out, log_path))
        runs.sort(key=lambda r: r.node)
        self.runs += runs
        return runs

    def wait(self, runs: list[NodeRun], timeout: float) -> list[NodeRun]:
        """Wait for every node's command (`timeout` seconds in all; then every process is killed
        and TimeoutError raised)."""
        start = time.monotonic()
        for run in runs:
            left = timeout - (time.monotonic() - start)
            try:
                run.returncode = run.proc.wait(timeout=max(left, 0.1))
            except subprocess.TimeoutExpired:
                self.stop()
                raise TimeoutError(f"node {run.node} did not finish within {timeout:.0f} s; its log: "
                                   + run.log[-3000:]) from None
            run.elapsed_s = time.monotonic() - start
        return runs

    def run(self, argv: list[str], timeout: float = 300.0, port: int = 29700, name: str = "run",
            env: dict[str, str] | None = None) -> list[NodeRun]:
        """`start` then `wait`."""
        return self.wait(self.start(argv, port, name, env), timeout)

    def stop(self) -> None:
        """Kill every launch still running (its whole process group: launcher, torchrun, ranks)."""
        for run in self.runs:
            if run.proc.poll() is None:
                try:
                    os.killpg(run.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            run.proc.wait()
