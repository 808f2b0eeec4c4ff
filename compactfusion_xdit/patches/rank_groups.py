"""xfuser's process groups for given degrees, computed without importing xfuser (launcher dry run).

xfuser 0.7.0 (``core/distributed/parallel_state.py``, ``initialize_model_parallel``) orders ranks
``tp-sp-pp-cfg-dp`` with its ``RankGenerator`` (``core/distributed/utils.py``, a module that
imports nothing of xfuser, loaded here from its file so the package's slow import is skipped), and
yunchang's ``set_seq_parallel_pg`` (``use_ulysses_low``) cuts the world into blocks of
``ulysses * ring`` consecutive ranks, each holding Ulysses groups of consecutive ranks and ring
groups of every ``ulysses``-th rank (the blocks are xfuser's sequence groups when tp is 1).
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

_GENERATOR: Any = None


def _rank_generator_class():
    global _GENERATOR
    if _GENERATOR is None:
        spec = importlib.util.find_spec("xfuser")
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError("xfuser is not installed")
        path = os.path.join(spec.submodule_search_locations[0], "core", "distributed", "utils.py")
        module_spec = importlib.util.spec_from_file_location("_cfx_xfuser_rank_utils", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        _GENERATOR = module.RankGenerator
    return _GENERATOR


def rank_groups(tp: int, ulysses: int, ring: int, pp: int, cfg: int, dp: int) -> dict[str, list[list[int]]]:
    """Global ranks of each group kind: ``tensor``, ``sequence``, ``ulysses``, ``ring``, ``pipefusion``,
    ``cfg``, ``data`` (one list per group), as xfuser and yunchang build them."""
    sp = ulysses * ring
    generator = _rank_generator_class()(tp, sp, pp, cfg, dp, 1, "tp-sp-pp-cfg-dp")
    offsets = range(0, generator.world_size, sp)
    return {
        "tensor": generator.get_ranks("tp"),
        "sequence": generator.get_ranks("sp"),
        "ulysses": [list(range(o + i * ulysses, o + (i + 1) * ulysses)) for o in offsets for i in range(ring)],
        "ring": [list(range(o + i, o + sp, ulysses)) for o in offsets for i in range(ulysses)],
        "pipefusion": generator.get_ranks("pp"),
        "cfg": generator.get_ranks("cfg"),
        "data": generator.get_ranks("dp"),
    }
