"""Ray workers of xfuser (``xfuser.ray``: ``RayDiffusionPipeline`` starts one Ray actor per GPU)
get the patches through Ray's worker setup hook.

    import ray, compactfusion_xdit.ray_support as cfx_ray
    ray.init(runtime_env=cfx_ray.runtime_env("residual-int4"))   # before RayDiffusionPipeline.from_pretrained
    pipe = RayDiffusionPipeline.from_pretrained(...)              # every worker process installs the plugin

xfuser calls ``ray.init()`` only when Ray is not initialised yet, so initialising it first with this
runtime environment is the one-line switch. Each worker process runs `setup_worker` when it starts,
before xfuser builds its distributed groups or the model. xfuser's runner and ``xDiTParallel`` do not
use Ray (torchrun ranks).

xfuser's Ray pipeline places one actor per GPU and is CUDA-only. `run` places the plugin's own
ranks with Ray instead (CPU or GPU actors, one or many nodes): each actor runs the worker code of
the ``xfuser`` command and the driver gets the output and the stats back.

    import compactfusion_xdit.ray_support as cfx_ray
    out = cfx_ray.run(["--model", "tiny-flux", "--ulysses_degree", "2", "--compression", "residual-int4",
                       "--output_type", "latent"], address="auto")      # a running cluster (ray start --head)
    out["outputs"][0], out["stats"][0]["ratio"]

Ray is an optional extra: ``pip install 'compactfusion-xdit[ray]'``.
"""

from __future__ import annotations

from typing import Any

from compactfusion_xdit import api, envs

SETUP_HOOK = "compactfusion_xdit.ray_support.setup_worker"


def runtime_env(compression: str = "residual-int4", base: dict[str, Any] | None = None) -> dict[str, Any]:
    """A Ray ``runtime_env`` (merged into `base`) whose workers install the plugin with `compression`."""
    from compactfusion_xdit.core.config import CompressionConfig

    name = CompressionConfig.parse(compression).name  # a bad name fails here, not in every worker
    env = dict(base or {})
    env["env_vars"] = {**env.get("env_vars", {}), envs.COMPRESSION: name}
    env["worker_process_setup_hook"] = SETUP_HOOK
    return env


def setup_worker() -> None:
    """Ray's worker setup hook: install the plugin with ``$CFX_COMPRESSION``."""
    api.install_from_env()


# ----- ranks placed by Ray ---------------------------------------------------------------------
class RankActor:
    """One rank of the ``xfuser`` worker (`compactfusion_xdit.rank.worker`) in a Ray actor: the
    same code a torchrun rank runs, with the placement Ray chose instead of torchrun's."""

    def node(self) -> tuple[str, int]:
        """This actor's node address and a free port on it (rank 0's become the rendezvous)."""
        import ray

        from compactfusion_xdit.cli.ports import free_port

        return ray.util.get_node_ip_address(), free_port()

    def serve(self, argv: list[str], rank: int, world_size: int, master: tuple[str, int], nodes: int,
              threads: int) -> dict[str, Any]:
        """Serve the run's request(s) as global rank `rank`; returns the output (output rank only)
        and each request's stats (bytes summed over every rank)."""
        import os

        os.environ.update(RANK=str(rank), LOCAL_RANK="0", WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR=master[0], MASTER_PORT=str(master[1]), GROUP_WORLD_SIZE=str(nodes),
                          OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
        import torch

        torch.set_num_threads(threads)
        from compactfusion_xdit.rank import outputs, worker

        outputs.quiet_libraries(verbose="--verbose" in argv)
        args = worker.parse_args(argv)
        results = worker.serve(args)
        return {"rank": rank, "is_output_rank": results[0].is_output_rank,
                "outputs": [r.output for r in results] if results[0].is_output_rank else None,
                "stats": [r.stats for r in results]}


def run(argv: list[str], address: str | None = "auto", cpus_per_rank: float = 1, gpus_per_rank: float = 0,
        timeout_s: float = 900.0) -> dict[str, Any]:
    """Run the ``xfuser`` flags `argv` (``--model``, degrees, input, ``--compression*``) on ranks that
    Ray places: one actor per rank, packed node by node in rank order (a placement group), the
    rendezvous on rank 0's node, the plugin installed in every worker (`runtime_env`). Connects to
    the cluster at `address` unless Ray is initialised already. Returns the output rank's
    ``{"outputs", "stats"}`` (one entry per request; stats summed over every rank).

        out = ray_support.run(["--model", "tiny-flux", "--ulysses_degree", "2", "--compression", "residual-int4",
                               "--output_type", "latent"])
    """
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from compactfusion_xdit.cli import checks, plan

    ns = plan.preparse(argv)
    world = plan.world_size(ns)
    name = checks.compression_config(ns).name  # a bad flag fails here, once
    if not ray.is_initialized():
        ray.init(address=address, runtime_env=runtime_env(name), log_to_driver=False)
    bundle = {"CPU": cpus_per_rank, **({"GPU": gpus_per_rank} if gpus_per_rank else {})}
    group = placement_group([bundle] * world, strategy="PACK")
    actors = []
    try:
        ray.get(group.ready(), timeout=timeout_s)
        cls = ray.remote(RankActor)
        actors = [cls.options(num_cpus=cpus_per_rank, num_gpus=gpus_per_rank,
                              scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=r)
                              ).remote() for r in range(world)]
        nodes = ray.get([a.node.remote() for a in actors], timeout=timeout_s)
        threads = max(1, int(cpus_per_rank))
        results = ray.get([a.serve.remote(argv, r, world, nodes[0], len({ip for ip, _ in nodes}), threads)
                           for r, a in enumerate(actors)], timeout=timeout_s)
    finally:
        for actor in actors:
            ray.kill(actor)
        remove_placement_group(group)
    out = next(r for r in results if r["is_output_rank"])
    return {"outputs": out["outputs"], "stats": out["stats"], "world_size": world}
