"""Fused Triton codec kernels == the torch arithmetic of docs/codec_format.md.

The checks themselves live in tests/codecs/_fused_checks.py (see its docstring for the exact properties
and bounds). On CPU they run under Triton's interpreter in a subprocess, so TRITON_INTERPRET never
reaches this pytest process; on CUDA they run in-process on the real kernels.
"""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from compactfusion_xdit.codecs import fused

HERE = os.path.dirname(os.path.abspath(__file__))
CODECS = ["int8", "int4", "int2", "1bit"]
HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available()


def _checks():
    spec = importlib.util.spec_from_file_location("_fused_checks", os.path.join(HERE, "_fused_checks.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install triton)")
@pytest.mark.slow  # CI time (~21 s); scripts/gpu_check.sh runs the kernels on a GPU
def test_interpreter_kernels_match_reference():
    repo = os.path.dirname(HERE)
    path = os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", PYTHONPATH=path)
    env.pop("CFX_FORCE_TORCH", None)
    proc = subprocess.run([sys.executable, os.path.join(HERE, "_fused_checks.py"), *CODECS],
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.stdout.strip().endswith("0 failures")


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs a CUDA device and triton")
@pytest.mark.parametrize("codec", CODECS)
def test_cuda_kernels_match_reference(codec):
    checks = _checks()
    fails = checks.check_codec(codec, "cuda", checks.CUDA_CASES)
    assert not fails, "\n".join(fails[:40])


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs a CUDA device and triton")
@pytest.mark.parametrize("codec", CODECS)
def test_cuda_codecs_dispatch_to_fused_and_agree_with_torch_path(codec):
    fails = _checks().check_against_codecs(codec, "cuda", shape=(1031, 3072), dtype=torch.float16)
    assert not fails, "\n".join(fails[:40])


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs a CUDA device and triton")
def test_cuda_division_by_scale_is_ieee():
    fails = _checks().check_division("cuda", rows=65536)
    assert not fails, fails


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs a CUDA device and triton")
@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_fused_sender_torch_receiver_stay_in_sync(codec, dtype):
    """Ten steps of a drifting signal: fused sender cache == reference receiver cache, bitwise."""
    ref = _checks().ref
    gen = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(777, 3073, device="cuda", generator=gen)
    sender = torch.zeros(777, 3073, device="cuda", dtype=dtype)
    receiver = sender.clone()
    for _ in range(10):
        x = x + 0.2 * torch.randn(x.shape, device="cuda", generator=gen)
        tensors = fused.encode_tensors(codec, x.to(dtype), sender)
        ref.decode_residual(codec, tensors, receiver)
        assert torch.equal(sender, receiver)


def test_supports_only_fused_codecs_on_cuda(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("CFX_FORCE_TORCH", raising=False)
    cpu = torch.zeros(4, 8, dtype=torch.float16)
    assert not fused.supports("int4", cpu)
    if HAS_CUDA and HAS_TRITON:
        gpu = cpu.cuda()
        assert all(fused.supports(name, gpu) for name in CODECS)
        assert not fused.supports("lowrank-4", gpu) and not fused.supports("none", gpu)
        assert not fused.supports("int4", gpu.view(-1))
        monkeypatch.setenv("CFX_FORCE_TORCH", "1")
        assert not fused.supports("int4", gpu)


def test_supports_cpu_only_under_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("CFX_FORCE_TORCH", raising=False)
    x = torch.zeros(4, 8, dtype=torch.bfloat16)
    assert fused.supports("1bit", x) == HAS_TRITON
    assert not fused.supports("lowrank-2", x)
    monkeypatch.setenv("CFX_FORCE_TORCH", "1")
    assert not fused.supports("1bit", x)


def test_a_missing_triton_is_said_once_and_the_torch_path_takes_over(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # CPU tensors stand in for CUDA ones
    monkeypatch.delenv("CFX_FORCE_TORCH", raising=False)
    monkeypatch.setattr(fused, "triton_available", lambda: False)
    fused._warn_no_triton.cache_clear()
    x = torch.zeros(4, 8)
    with pytest.warns(RuntimeWarning, match="Triton is not installed") as record:
        assert not fused.supports("int4", x) and not fused.supports("int2", x)
    assert len([w for w in record if "Triton is not installed" in str(w.message)]) == 1
    fused._warn_no_triton.cache_clear()


def test_bad_arguments_name_the_problem():
    x = torch.zeros(4, 8)
    with pytest.raises(ValueError, match="lowrank-4"):
        fused.encode_tensors("lowrank-4", x)
    with pytest.raises(ValueError, match="float16/bfloat16/float32"):
        fused.encode_tensors("int4", torch.zeros(4, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match="base cache .* does not match x"):
        fused.encode_tensors("int4", x, torch.zeros(4, 9))
    with pytest.raises(ValueError, match="base shape"):
        fused.decode_tensors("int4", (torch.zeros(4, 4, dtype=torch.uint8),), (4, 8), x.dtype,
                             base=torch.zeros(5, 8))
