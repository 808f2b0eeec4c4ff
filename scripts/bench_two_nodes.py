"""Two nodes on one machine, the link between them shaped: request time per compression and scope.

    sudo python scripts/bench_two_nodes.py --rate 100mbit --requests 4 \\
        --runs none residual-int4:all residual-int4:inter-node

Each run is one launch of the ``xfuser`` command on both nodes (`benchmarks.two_nodes`: two network
namespaces, 2 ranks each, Ulysses 2 inside each node x ring 2 across), serving ``1 + --requests``
requests (the first warms up and is not timed); the figure is the median request time of the output
rank, with the bytes each link class carried (summed over the timed requests and every rank).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

from compactfusion_xdit.benchmarks import netns
from compactfusion_xdit.benchmarks.two_nodes import TwoNodes

BASE = ["--model", "tiny-flux", "--ulysses_degree", "2", "--ring_degree", "2", "--output_type", "latent",
        "--seed", "42"]


def run_flags(spec: str) -> list[str]:
    """``none`` or ``CODEC:SCOPE`` -> the compression flags."""
    codec, _, scope = spec.partition(":")
    return ["--compression", codec, *(["--compression-scope", scope] if scope else [])]


def measure(nodes: TwoNodes, spec: str, args, port: int) -> dict:
    argv = [*BASE, "--height", str(args.size), "--width", str(args.size), "--num_inference_steps", str(args.steps),
            *[x for _ in range(args.requests + 1) for x in ("--prompt", "a cat")], *run_flags(spec)]
    runs = nodes.run(argv, timeout=args.timeout, port=port, name=spec.replace(":", "-"))
    for run in runs:
        if run.returncode != 0:
            raise RuntimeError(f"{spec}: node {run.node} exited {run.returncode}: {run.log[-2000:]}")
    with open(os.path.join(runs[1].output_dir, "stats.json")) as f:
        timed = json.load(f)["requests"][1:]
    links: dict[str, dict[str, int]] = {}
    for request in timed:
        for link_class, c in request.get("links", {}).items():
            total = links.setdefault(link_class, {"raw_bytes": 0, "sent_bytes": 0})
            total["raw_bytes"] += c["raw_bytes"]
            total["sent_bytes"] += c["sent_bytes"]
    return {"run": spec, "median_s": statistics.median(r["elapsed_s"] for r in timed),
            "times_s": [r["elapsed_s"] for r in timed], "links": links}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", default="100mbit", help="the inter-node link (e.g. 100mbit, 1gbit, unshaped)")
    parser.add_argument("--runs", nargs="+", default=["none", "residual-int4:all", "residual-int4:inter-node"])
    parser.add_argument("--requests", type=int, default=4, help="timed requests per run (after one warm-up request)")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    reason = netns.unavailable_reason()
    if reason:
        print(f"bench_two_nodes.py: error: {reason}", file=sys.stderr)
        return 2
    results = []
    with TwoNodes(tag="b2e0d", net=81) as nodes:
        nodes.shape(args.rate)
        for i, spec in enumerate(args.runs):
            results.append(measure(nodes, spec, args, 29760 + i))
            r = results[-1]
            inter = r["links"].get("inter-node", {})
            print(f"{spec:<28} {r['median_s']:.3f} s/request  inter-node {inter.get('sent_bytes', 0)} of "
                  f"{inter.get('raw_bytes', 0)} bytes  times {['%.3f' % t for t in r['times_s']]}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rate": args.rate, "size": args.size, "steps": args.steps, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
