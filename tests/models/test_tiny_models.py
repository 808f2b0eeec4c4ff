"""Built-in tiny models: deterministic weights, prompt in -> image out, an atomic cached folder."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from compactfusion_xdit.models import tiny

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NAMES = ("tiny-flux", "tiny-pixart", "tiny-sd3")


def state(pipe) -> dict[str, torch.Tensor]:
    """Every weight of every torch component, keyed ``component.parameter``."""
    out = {}
    for component_name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module):
            out.update({f"{component_name}.{k}": v for k, v in component.state_dict().items()})
    return out


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def test_builtin_names():
    assert tiny.BUILTIN_MODELS == NAMES + ("digits-flux",)  # the trained one is tested in test_digits_model.py


def test_unknown_name_is_refused_with_the_valid_names():
    with pytest.raises(ValueError, match="tiny-flux, tiny-pixart, tiny-sd3"):
        tiny.build_pipeline("tiny-unet")


@pytest.mark.parametrize("name", NAMES)
def test_two_builds_have_bitwise_equal_weights(name):
    assert_bitwise_equal(state(tiny.build_pipeline(name)), state(tiny.build_pipeline(name)))


def test_building_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    tiny.build_pipeline("tiny-sd3")
    assert torch.equal(torch.rand(4), expected)


@pytest.mark.parametrize("name", NAMES)
def test_transformer_heads_split_over_ulysses_2_and_4(name):
    heads = tiny.build_pipeline(name).transformer.config.num_attention_heads
    assert heads % 2 == 0 and heads % 4 == 0


def test_flux_has_double_and_single_blocks_with_consistent_rope_axes():
    config = tiny.build_pipeline("tiny-flux").transformer.config
    assert config.num_layers >= 2 and config.num_single_layers >= 2
    assert sum(config.axes_dims_rope) == config.attention_head_dim


@pytest.mark.parametrize("name", NAMES)
def test_prompt_in_image_out_single_process(name):
    pipe = tiny.build_pipeline(name)
    kwargs = {"use_resolution_binning": False} if name == "tiny-pixart" else {}
    out = pipe("a cat", height=64, width=48, num_inference_steps=8, max_sequence_length=16,
               generator=torch.Generator().manual_seed(42), **kwargs)
    (image,) = out.images
    assert image.size == (48, 64) and image.mode == "RGB"


def test_bfloat16_build_casts_every_weight():
    weights = state(tiny.build_pipeline("tiny-pixart", dtype=torch.bfloat16))
    assert {v.dtype for v in weights.values() if v.is_floating_point()} == {torch.bfloat16}


# --------------------------------------------------------------------------------------------
# materialize
# --------------------------------------------------------------------------------------------


def test_materialize_writes_a_diffusers_folder_with_the_built_weights(tmp_path):
    from diffusers import DiffusionPipeline

    path = tiny.materialize("tiny-pixart", cache_dir=str(tmp_path))
    assert path == str(tmp_path / f"tiny-pixart-v{tiny.MODEL_VERSION}")
    assert os.path.isfile(os.path.join(path, "model_index.json"))
    assert_bitwise_equal(state(DiffusionPipeline.from_pretrained(path)), state(tiny.build_pipeline("tiny-pixart")))
    assert os.listdir(tmp_path) == [os.path.basename(path)]  # no temporary folder left


def test_materialize_reuses_the_cached_folder(tmp_path, monkeypatch):
    path = tiny.materialize("tiny-sd3", cache_dir=str(tmp_path))
    monkeypatch.setattr(tiny, "build_pipeline", lambda *a, **k: pytest.fail("rebuilt a cached model"))
    assert tiny.materialize("tiny-sd3", cache_dir=str(tmp_path)) == path


def test_materialize_defaults_to_cfx_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CFX_CACHE", str(tmp_path))
    assert tiny.cached_path("tiny-flux") == str(tmp_path / f"tiny-flux-v{tiny.MODEL_VERSION}")


def test_materialize_losing_a_race_keeps_the_winners_folder(tmp_path, monkeypatch):
    # Another process renamed its complete folder into place after we checked the cache.
    path = tiny.materialize("tiny-sd3", cache_dir=str(tmp_path))
    before = sorted(os.listdir(path))
    real, calls = tiny.is_materialized, []

    def stale_first_check(*args):
        calls.append(args)
        return False if len(calls) == 1 else real(*args)

    monkeypatch.setattr(tiny, "is_materialized", stale_first_check)
    assert tiny.materialize("tiny-sd3", cache_dir=str(tmp_path)) == path
    assert sorted(os.listdir(path)) == before
    assert os.listdir(tmp_path) == [os.path.basename(path)]


def test_materialize_failure_leaves_nothing_behind(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(tiny, "build_pipeline", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        tiny.materialize("tiny-sd3", cache_dir=str(tmp_path))
    assert os.listdir(tmp_path) == []


def test_concurrent_materialize_from_two_processes_gives_one_complete_folder(tmp_path):
    code = ("import sys; from compactfusion_xdit.models import tiny; "
            "print(tiny.materialize('tiny-pixart', cache_dir=sys.argv[1]))")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120)[0].strip().splitlines()[-1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outs[0] == outs[1] == tiny.cached_path("tiny-pixart", str(tmp_path))
    assert os.listdir(tmp_path) == [os.path.basename(outs[0])]
    assert tiny.is_materialized("tiny-pixart", str(tmp_path))
