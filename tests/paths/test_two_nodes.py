"""Two nodes on one machine (`benchmarks.two_nodes`): two network namespaces, 2 ranks each, each
running the ``xfuser`` command as a user types it on its own host (``--nnodes 2 --node_rank i
--master_addr <node 0> --master_port P``), Ulysses 2 inside each node x ring 2 across the nodes.

Slow (each launch starts 4 ranks: 1-2 minutes here) and root only (network namespaces); skipped
with the reason where namespaces cannot be made. Every namespace, process and qdisc is removed on
the way out, also after a failure.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from compactfusion_xdit.benchmarks import netns
from compactfusion_xdit.benchmarks.metrics import range_psnr as psnr
from compactfusion_xdit.core.scope import INTER, INTRA

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

HERE = os.path.dirname(os.path.abspath(__file__))
ARGV = ["--model", "tiny-flux", "--height", "64", "--width", "64", "--num_inference_steps", "3", "--prompt", "a cat",
        "--seed", "42", "--output_type", "latent", "--max_sequence_length", "16"]
LAYOUT = ["--ulysses_degree", "2", "--ring_degree", "2"]
TIMEOUT = 400.0
EXACT = 1e-4
#: the ring tests' bound for residual-int4 on the random tiny Flux (tests/paths/test_ring_compression.py)
PSNR_RESIDUAL_INT4 = 100.0
#: a node whose peers vanished must end within this many seconds
FAULT_DEADLINE_S = 60.0


@pytest.fixture(scope="module")
def nodes():
    reason = netns.unavailable_reason()
    if reason:
        pytest.skip(f"two-node tests {reason}")
    from compactfusion_xdit.benchmarks.two_nodes import TwoNodes

    with TwoNodes(tag="20de5", net=79) as made:
        yield made
    assert netns.leftovers("20de5") == {"namespaces": [], "links": []}


def launch(nodes, argv, name, port, timeout=TIMEOUT):
    runs = nodes.run(argv, timeout=timeout, port=port, name=name)
    for run in runs:
        assert run.returncode == 0, f"node {run.node}: " + run.log[-3000:]
    latents = np.load(os.path.join(runs[1].output_dir, "latents.npy"))  # the last rank writes
    with open(os.path.join(runs[1].output_dir, "stats.json")) as f:
        stats = json.load(f)
    return latents, stats


@pytest.fixture(scope="module")
def uncompressed(nodes):
    return launch(nodes, [*ARGV, *LAYOUT, "--compression", "none"], "none", 29741)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("one-process"))
    from compactfusion_xdit.benchmarks.two_nodes import xfuser_command

    proc = subprocess.run([*xfuser_command(), *ARGV, "--output_dir", out], capture_output=True, text=True,
                          timeout=TIMEOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return np.load(os.path.join(out, "latents.npy"))


def test_xfuser_puts_ulysses_inside_the_nodes_and_the_ring_across():
    """yunchang's ``set_seq_parallel_pg`` (use_ulysses_low): Ulysses groups are consecutive ranks,
    ring groups every ulysses-th rank; torchrun puts ranks 2i, 2i+1 on node i."""
    from compactfusion_xdit.patches.rank_groups import rank_groups

    groups = rank_groups(1, 2, 2, 1, 1, 1)
    assert groups["ulysses"] == [[0, 1], [2, 3]] and groups["ring"] == [[0, 2], [1, 3]]


def test_two_nodes_uncompressed_equal_one_process(uncompressed, one_process):
    latents, stats = uncompressed
    assert latents.shape == one_process.shape
    assert float(np.abs(latents - one_process).max()) <= EXACT
    # what the real groups did: every Ulysses byte stayed inside a node, every ring byte crossed
    assert set(stats["paths"]["ulysses"]["links"]) == {INTRA}
    assert set(stats["paths"]["ring"]["links"]) == {INTER}


def test_inter_node_scope_codes_only_the_ring(nodes, uncompressed):
    latents, stats = launch(nodes, [*ARGV, *LAYOUT, "--compression", "residual-int4", "--compression-scope",
                                    "inter-node", "--compression-check"], "inter-node", 29742)
    ulysses, ring = stats["paths"]["ulysses"], stats["paths"]["ring"]
    assert ulysses["raw_bytes"] == ulysses["sent_bytes"] == uncompressed[1]["paths"]["ulysses"]["raw_bytes"]
    assert set(ulysses["links"]) == {INTRA}
    assert set(ring["links"]) == {INTER} and ring["sent_bytes"] < ring["raw_bytes"]
    assert ring["raw_bytes"] == uncompressed[1]["paths"]["ring"]["raw_bytes"]
    assert stats["links"][INTER]["sent_bytes"] == ring["sent_bytes"]
    assert stats["cache_consistent"] is True
    assert psnr(uncompressed[0], latents) > PSNR_RESIDUAL_INT4


def test_the_liveness_responder_listens_only_on_the_group_interface(nodes, tmp_path):
    """Node 0 gets a second interface (10.80.0.1) the group does not use: the responder of every
    rank answers on the group's address and refuses on the other."""
    ns = nodes.namespace(0)
    for cmd in (["link", "add", "cfxo0", "type", "veth", "peer", "name", "cfxo1"],  # both ends inside node 0
                ["addr", "add", "10.80.0.1/24", "dev", "cfxo0"], ["link", "set", "cfxo0", "up"],
                ["link", "set", "cfxo1", "up"]):
        subprocess.run(["ip", "-n", ns, *cmd], check=True)
    procs = []
    for node in (1, 0):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=2", f"--node_rank={node}",
               f"--master_addr={nodes.address(0)}", "--master_port=29743", os.path.join(HERE, "_two_nodes_probe.py"),
               "10.80.0.1", str(tmp_path)]
        procs.append(subprocess.Popen(nodes.exec_command(node, cmd), env=nodes.env(node), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, start_new_session=True))
    for proc in procs:
        out, _ = proc.communicate(timeout=TIMEOUT)
        assert proc.returncode == 0, out[-3000:]
    results = [json.load(open(tmp_path / f"probe{r}.json")) for r in range(4)]
    assert [r["address"] for r in results] == [nodes.address(0)] * 2 + [nodes.address(1)] * 2
    assert all(r["on_group_address"] and r["peers_alive"] for r in results)
    assert not any(r["on_other_address"] for r in results[:2])  # node 0's second interface: refused


def test_killing_the_node1_launcher_ends_node0_naming_the_lost_ranks(nodes):
    runs = nodes.start([*ARGV[:7], "400", *ARGV[8:], *LAYOUT], port=29744, name="fault")
    start = time.monotonic()
    while "denoising:" not in runs[0].log:  # mid-request: the first step has started
        assert time.monotonic() - start < TIMEOUT, runs[0].log[-3000:]
        assert runs[0].proc.poll() is None and runs[1].proc.poll() is None, runs[0].log[-3000:] + runs[1].log[-3000:]
        time.sleep(0.5)
    time.sleep(1.0)
    os.kill(runs[1].proc.pid, signal.SIGKILL)  # the xfuser launcher of node 1
    killed = time.monotonic()
    nodes.wait(runs[:1], timeout=FAULT_DEADLINE_S)
    assert time.monotonic() - killed < FAULT_DEADLINE_S
    assert runs[0].returncode == 1
    lines = [ln for ln in runs[0].log.splitlines() if "error" in ln]
    assert any("ranks 2, 3 were lost" in ln for ln in lines), lines
    assert not any("Traceback" in ln for ln in runs[0].log.splitlines())
    deadline = time.monotonic() + 30
    while any(nodes_pids(nodes, n) for n in (0, 1)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert [nodes_pids(nodes, n) for n in (0, 1)] == [[], []]  # no orphan on either node


def nodes_pids(nodes, node: int) -> list[str]:
    return subprocess.run(["ip", "netns", "pids", nodes.namespace(node)], capture_output=True, text=True).stdout.split()
