"""``--compression-scope inter-node``: exchanges inside one host go raw (stock bytes, no cache),
exchanges between hosts are coded, and stats split the bytes by link class.

The hosts are faked on one machine: 4 gloo ranks, ranks 0-1 named host "a" and 2-3 host "b"
(what `CompressionSession.learn_hosts` gathers from ``hostname|address`` on real nodes), with
xfuser's Ulysses 2 x ring 2 groups (Ulysses [0,1] [2,3] inside the hosts, ring [0,2] [1,3] across).
The two-node runs of the real ``xfuser`` command are in tests/paths/test_two_nodes.py (slow, root).
"""

from __future__ import annotations

import os

import pytest
import torch

from compactfusion_xdit.core.config import CompressionConfig
from compactfusion_xdit.core.scope import INTER, INTRA, LinkScope, check_scope, host_indices
from compactfusion_xdit.testing import run_ranks

HERE = os.path.abspath(__file__)
STEPS = 4
HOSTS = ["a|10.0.0.1", "a|10.0.0.1", "b|10.0.0.2", "b|10.0.0.2"]


def test_host_indices_follow_first_appearance():
    assert host_indices(["n2", "n1", "n2", "n3"]) == (0, 1, 0, 2)


def test_inter_node_scope_codes_only_exchanges_that_cross_hosts():
    scope = LinkScope.from_identities("inter-node", HOSTS, me=1)
    assert [scope.codes(g) for g in ([0, 1], [2, 3], [0, 2], [1, 3], [0, 1, 2, 3], (1, 0))] == [
        False, False, True, True, True, False]
    assert scope.link_class(0) == INTRA and scope.link_class(3) == INTER
    assert scope.split([0, 2, 3]) == (1, 2)
    assert scope.nodes == 2
    everything = LinkScope.from_identities("all", HOSTS, me=1)
    assert all(everything.codes(g) for g in ([0, 1], [2, 3], [0, 2]))


def test_scope_is_checked_where_it_is_given():
    assert CompressionConfig.parse("residual-int4", scope="inter-node").scope == "inter-node"
    assert CompressionConfig.parse("residual-int4").to_dict()["scope"] == "all"
    with pytest.raises(ValueError, match="unknown compression scope 'nodes'; valid scopes: all, inter-node"):
        check_scope("nodes")
    with pytest.raises(ValueError, match="valid scopes"):
        CompressionConfig.parse("residual-int4", scope="intra")


def test_flag_and_yaml_give_the_scope(tmp_path):
    from compactfusion_xdit.cli import dry_run, plan, yaml_config

    argv = ["--model", "tiny-flux", "--ulysses_degree", "2", "--ring_degree", "2", "--compression", "residual-int4",
            "--compression-scope", "inter-node"]
    assert plan.checks.compression_config(plan.preparse(argv)).scope == "inter-node"
    config = tmp_path / "two-nodes.yaml"
    config.write_text("model: tiny-flux\nparallel: {ulysses_degree: 2, ring_degree: 2}\n"
                      "launcher: {nnodes: 2, master_addr: 10.0.0.1}\n"
                      "compression: {codec: residual-int4, scope: inter-node}\n")
    expanded = yaml_config.expand_argv(["--config", str(config)])
    assert plan.checks.compression_config(plan.preparse(expanded)).scope == "inter-node"
    report = dry_run.report(expanded)
    assert "ulysses      [0,1] [2,3]  (inside nodes)" in report
    assert "ring         [0,2] [1,3]  (across nodes)" in report
    assert "scope inter-node" in report


def exchanges(comm, ulysses, ring, rank: int, step: int):
    """One Ulysses all-to-all (3 keys), one ring exchange, one all-gather over the world, and one
    point-to-point message inside host "a" (0 -> 1) and one across (1 -> 3). Returns what arrived."""
    g = torch.Generator().manual_seed(100 * rank + step)
    base = torch.Generator().manual_seed(rank)
    drift = 0.05 * step
    qkv = [torch.randn(4, 3, 8, generator=base) + drift * torch.randn(4, 3, 8, generator=g) for _ in range(3)]
    got = {"ulysses": comm.all_to_all_many([("ulysses", 0, r) for r in "qkv"], qkv, group=ulysses)}
    stock = [torch.empty_like(x) for x in qkv]
    for x, out in zip(qkv, stock):
        torch.distributed.all_to_all_single(out, x, group=ulysses)
    got["stock_ulysses"] = stock
    k = torch.randn(6, 8, generator=base) + drift
    got["ring"] = [t[0].clone() for _, t in comm.ring_exchange(("ring", 0), (k,), group=ring)]
    got["gather"] = comm.all_gather(("patch", 0, "kv"), k)
    if rank == 0:
        comm.isend(("pipefusion", "intra"), k, dst=1).wait()
    elif rank == 1:
        got["p2p_intra"] = comm.recv(("pipefusion", "intra"), k.shape, k.dtype, src=0)
    if rank == 1:
        comm.isend(("pipefusion", "inter"), k, dst=3).wait()
    elif rank == 3:
        got["p2p_inter"] = comm.recv(("pipefusion", "inter"), k.shape, k.dtype, src=1)
    return got


def run_scoped(rank: int, world: int):
    """The same exchanges in scope inter-node, then in scope all (a fresh session each)."""
    import torch.distributed as dist

    from compactfusion_xdit.core.session import CompressionSession

    ulysses = [dist.new_group([0, 1]), dist.new_group([2, 3])][rank // 2]
    ring = [dist.new_group([0, 2]), dist.new_group([1, 3])][rank % 2]
    out = {}
    for scope in ("inter-node", "all"):
        session = CompressionSession(CompressionConfig.parse("residual-int4", scope=scope))
        session.learn_hosts(identity=HOSTS[rank])
        comm = session.comm()
        session.begin_request()
        results = []
        for step in range(STEPS):
            session.set_step(step)
            results.append(exchanges(comm, ulysses, ring, rank, step))
        cached = sorted({key[0] for side, key in session.state.cache_digests()})
        out[scope] = {"results": results, "stats": session.stats(), "mismatches": session.check_caches(),
                      "cached": cached}
    return out


@pytest.fixture(scope="module")
def launched():
    return run_ranks(f"{HERE}:run_scoped", 4, timeout=120)


@pytest.fixture
def inter_node(launched):
    return [r["inter-node"] for r in launched]


def test_scope_all_codes_the_links_inside_a_host_too(launched):
    for out in (r["all"] for r in launched):
        u = out["stats"]["paths"]["ulysses"]
        assert u["sent_bytes"] < u["raw_bytes"] and set(u["links"]) == {INTRA}
        assert "ulysses" in out["cached"] and out["mismatches"] == []


def test_exchanges_inside_a_host_are_stock_and_uncached(inter_node):
    for rank, out in enumerate(inter_node):
        for step in out["results"]:
            assert all(torch.equal(a, b) for a, b in zip(step["ulysses"], step["stock_ulysses"]))
        assert "ulysses" not in out["cached"]  # never seeded, never cached
        u = out["stats"]["paths"]["ulysses"]
        assert u["raw_bytes"] == u["sent_bytes"] and u["coded_messages"] == 0
        assert set(u["links"]) == {INTRA}
    assert inter_node[1]["results"][-1]["p2p_intra"].equal(inter_node[0]["results"][-1]["ring"][0])
    assert inter_node[1]["stats"]["paths"]["pipefusion"]["links"].get(INTER, {}).get("raw_bytes", 0) > 0


def test_exchanges_across_hosts_are_coded_with_consistent_caches(inter_node):
    for rank, out in enumerate(inter_node):
        assert out["mismatches"] == []
        assert {"ring", "patch"} <= set(out["cached"])
        ring = out["stats"]["paths"]["ring"]
        assert set(ring["links"]) == {INTER} and ring["sent_bytes"] < ring["raw_bytes"]
        assert ring["coded_messages"] == STEPS - 1  # one hop per step, the first step seeds
        links = out["stats"]["links"]  # totals per class: the sums over the paths
        assert links[INTER]["raw_bytes"] == sum(p["links"].get(INTER, {}).get("raw_bytes", 0)
                                               for p in out["stats"]["paths"].values())
        assert links[INTER]["sent_bytes"] < links[INTER]["raw_bytes"]
    # the world all-gather crosses hosts: coded on all its links (3 peers: 1 intra + 2 inter)
    patch = inter_node[0]["stats"]["paths"]["patch"]
    assert patch["links"][INTER]["raw_bytes"] == 2 * patch["links"][INTRA]["raw_bytes"]
    assert patch["sent_bytes"] < patch["raw_bytes"]
    sent = inter_node[1]["stats"]["paths"]["pipefusion"]["links"]
    assert sent[INTER]["sent_bytes"] < sent[INTER]["raw_bytes"]  # 1 -> 3 coded
    intra = inter_node[0]["stats"]["paths"]["pipefusion"]["links"][INTRA]
    assert intra["sent_bytes"] == intra["raw_bytes"]  # 0 -> 1 raw
    assert "pipefusion" in inter_node[3]["cached"] and "pipefusion" in inter_node[1]["cached"]
    assert "pipefusion" not in inter_node[0]["cached"]  # its only link stays inside host "a"
