"""The CPU/gloo patch layer: importable xfuser, exact install/uninstall, the lse attention.

The xfuser import (about 10 s) happens once, in a subprocess per behaviour that needs a fresh
interpreter, or in this process for the rest.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from compactfusion_xdit.patches._attrs import AttributePatcher

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU/gloo patches are inactive where CUDA is available")


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})


# --------------------------------------------------------------------------------------------
# AttributePatcher
# --------------------------------------------------------------------------------------------


class Owner:
    inherited = "base"


class Child(Owner):
    own = staticmethod(len)


def test_patcher_restores_replaced_added_and_inherited_attributes_exactly():
    mapping = {"a": 1}
    own = Child.__dict__["own"]
    patcher = AttributePatcher()
    patcher.replace(Child, "own", 1)
    patcher.replace(Child, "inherited", "shadow")
    patcher.replace(Child, "added", 2)
    patcher.replace_item(mapping, "a", 10)
    patcher.replace_item(mapping, "b", 20)
    assert (Child.own, Child.inherited, Child.added, mapping) == (1, "shadow", 2, {"a": 10, "b": 20})
    patcher.restore()
    assert Child.__dict__["own"] is own and "inherited" not in Child.__dict__ and Child.inherited == "base"
    assert not hasattr(Child, "added") and mapping == {"a": 1} and len(patcher) == 0


# --------------------------------------------------------------------------------------------
# Importable xfuser
# --------------------------------------------------------------------------------------------


def test_xfuser_imports_with_long_context_attention_and_without_triton():
    proc = run_python("""
        import sys
        sys.modules["triton"] = None          # as on a machine without Triton
        from compactfusion_xdit.patches import cpu_gloo
        cpu_gloo.make_xfuser_importable()
        import xfuser, yunchang.globals
        from xfuser.config import config
        from xfuser.core.distributed import parallel_state
        from xfuser.model_executor.layers import usp
        from xfuser.core.long_ctx_attention import xFuserLongContextAttention
        from xfuser.core.long_ctx_attention.ring import ring_flash_attn
        import xfuser.core.sparge_attention.block_mask as block_mask
        assert config.HAS_LONG_CTX_ATTN and parallel_state.HAS_LONG_CTX_ATTN
        assert usp.PROCESS_GROUP is yunchang.globals.PROCESS_GROUP
        from yunchang import LongContextAttention
        assert issubclass(xFuserLongContextAttention, LongContextAttention)
        assert hasattr(ring_flash_attn.xFuserRingFlashAttnFunc, "apply")
        assert sys.modules["triton"] is None  # the stand-in was lent to block_mask only
        try:
            block_mask.triton_fill_causal_mask[(1,)](None, 1.0)
        except RuntimeError as err:
            print("kernel:", err)
        cpu_gloo.make_xfuser_importable()     # idempotent
    """)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "kernel: triton kernel triton_fill_causal_mask needs Triton" in proc.stdout


def test_make_importable_after_xfuser_import_says_to_call_it_first():
    proc = run_python("""
        import sys, types
        sys.modules["xfuser.envs"] = types.ModuleType("xfuser.envs")
        from compactfusion_xdit.patches import cpu_gloo
        cpu_gloo.make_xfuser_importable()
    """)
    assert proc.returncode != 0
    assert "RuntimeError: xfuser.envs was imported before" in proc.stderr.strip().splitlines()[-1]


# --------------------------------------------------------------------------------------------
# install / uninstall (this process)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def xfuser_modules():
    from compactfusion_xdit.patches import cpu_gloo

    cpu_gloo.make_xfuser_importable()
    import xfuser.envs as envs
    from xfuser.core.distributed import attention_backend, group_coordinator, runtime_state

    return envs, attention_backend, group_coordinator, runtime_state


def _snapshot(envs, attention_backend, group_coordinator, runtime_state):
    pgc = group_coordinator.PipelineGroupCoordinator.__dict__
    return {
        "backend": envs.__dict__["get_torch_distributed_backend"],
        "flash": attention_backend.ATTENTION_FUNCTION_REGISTRY[attention_backend.AttentionBackendType.SDPA_FLASH],
        "select": runtime_state.RuntimeState.__dict__["_select_attention_backend"],
        "sync": group_coordinator.synchronize,
        "shapes": pgc["_communicate_shapes"],
        "isend": pgc["_pipeline_isend"],
        "isend_skip": pgc["_pipeline_isend_skip"],
    }


def test_install_replaces_and_uninstall_restores_every_attribute(xfuser_modules):
    from compactfusion_xdit import patches

    envs = xfuser_modules[0]
    before = _snapshot(*xfuser_modules)
    with pytest.raises(NotImplementedError):
        envs.get_torch_distributed_backend()
    patches.install()
    patches.install()  # idempotent
    during = _snapshot(*xfuser_modules)
    assert all(during[k] is not before[k] for k in before)
    assert envs.get_torch_distributed_backend() == "gloo"
    patches.uninstall()
    patches.uninstall()  # safe when nothing is installed
    after = _snapshot(*xfuser_modules)
    assert all(after[k] is before[k] for k in before)
    assert not patches.is_installed()


def test_cpu_attention_returns_true_log_sum_exp():
    from compactfusion_xdit.patches.cpu_gloo import cpu_flash_attention_with_lse

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8, generator=g) for _ in range(3))
    out, lse = cpu_flash_attention_with_lse(q, k, v)
    scores = q @ k.transpose(-1, -2) / 8 ** 0.5
    torch.testing.assert_close(lse, torch.logsumexp(scores, dim=-1))
    torch.testing.assert_close(out, torch.softmax(scores, dim=-1) @ v)
