"""Test support: `run_ranks` launches a function on several CPU/gloo ranks with a hard timeout."""

from compactfusion_xdit.cli.ports import free_port
from compactfusion_xdit.testing.ranks import RankFailure, kill_all, rank_env, run_ranks

__all__ = ["RankFailure", "free_port", "kill_all", "rank_env", "run_ranks"]
