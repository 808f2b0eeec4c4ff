"""The first minutes with the ``xfuser`` command: usage errors and ``--help`` answered before torch,
diffusers or xfuser is imported (nothing built), and ``--dry-run``'s status for a missing model.

No wall-clock assertions: what makes these answers fast is that the heavy modules are never imported,
and that is what the tests check (`sys.modules` after the command ran).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from compactfusion_xdit.cli import dry_run, flag_table, launcher, torchrun
from compactfusion_xdit.models import registry

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = 120  # seconds: the bound for a subprocess that must not get far
HEAVY = ("torch", "diffusers", "transformers", "xfuser")

#: Runs the launcher in-process, then prints which heavy modules it imported (last stdout line).
PROBE = ("import sys; from compactfusion_xdit.cli import launcher; rc = launcher.main(sys.argv[1:]); "
         f"print('imported:', ','.join(m for m in {HEAVY!r} if m in sys.modules) or 'none'); sys.exit(rc)")


def env(**extra: str) -> dict[str, str]:
    out = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    out.pop("CFX_DEBUG", None)
    return {**out, **extra}


def probe(argv: list[str], cache: str) -> tuple[int, list[str], str]:
    """(exit status, stdout lines before the probe's, stderr) of the launcher run in a fresh process
    with an empty model cache; asserts that nothing heavy was imported and nothing was built."""
    proc = subprocess.run([sys.executable, "-c", PROBE, *argv], cwd=REPO, env=env(CFX_CACHE=cache),
                          capture_output=True, text=True, timeout=QUICK)
    *out, last = proc.stdout.splitlines() or [""]
    assert last == "imported: none", (argv, proc.stdout[-2000:], proc.stderr[-2000:])
    assert not os.listdir(cache), os.listdir(cache)  # no built-in model was built for this answer
    return proc.returncode, out, proc.stderr


@pytest.fixture
def empty_cache(tmp_path) -> str:
    path = tmp_path / "cache"
    path.mkdir()
    return str(path)


# --------------------------------------------------------------------------------------------
# Usage errors and --help: nothing heavy imported, nothing built
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flags, message", [
    (["--model", "tiny-flux", "--use_cfg_parallel"],
     "Flux has no classifier-free guidance branch to split; drop --use_cfg_parallel"),
    (["--model", "digits-flux", "--use_cfg_parallel"],
     "Flux has no classifier-free guidance branch to split; drop --use_cfg_parallel"),
    (["--model", "tiny-flux", "--output_type", "np"], "--output_type 'np' is not supported; use pil or latent"),
    (["--model", "tiny-pixart", "--ulysses_degree", "3"],
     "the model has 4 attention heads, not divisible by --ulysses_degree 3; use a Ulysses degree that divides 4 "
     "(move the rest to --ring_degree)"),
    (["--model", "tiny-flux", "--ulysess_degree", "2"], "unrecognized flag --ulysess_degree; did you mean --ulysses_degree?"),
    (["--model", "tiny-flux", "--pipefusion_parallel_degree", "2", "--num_pipeline_patch", "1"],
     "--num_pipeline_patch 1 is smaller than --pipefusion_parallel_degree 2; use at least one patch per stage"),
])
def test_a_refused_launch_imports_nothing_heavy_and_builds_nothing(empty_cache, flags, message):
    code, out, err = probe([*flags, "--prompt", "a cat"], empty_cache)
    assert code == 2 and out == [] and err.splitlines() == [f"xfuser: error: {message}"], err


def test_a_local_folders_config_is_read_without_torch(empty_cache, tmp_path):
    folder = tmp_path / "model"
    (folder / "transformer").mkdir(parents=True)
    (folder / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')
    (folder / "transformer" / "config.json").write_text('{"num_attention_heads": 24}')
    code, _, err = probe(["--model", str(folder), "--ulysses_degree", "5"], empty_cache)
    assert code == 2 and "24 attention heads, not divisible by --ulysses_degree 5" in err


def test_help_comes_from_the_snapshot_without_xfuser(empty_cache):
    code, out, err = probe(["--help"], empty_cache)
    assert code == 0 and err == "" and out[0].startswith("usage: xfuser [-h] --model MODEL")
    text = " ".join(" ".join(out).split())
    for flag in ("--ulysses_degree", "--use_cfg_parallel", "--compression", "--dry-run", "--nproc_per_node"):
        assert flag in text, flag
    assert "Ulysses sequence parallel degree. Used in attention layer." in text  # xfuser's help texts travel


def test_the_snapshot_help_is_xfusers_help():
    from compactfusion_xdit.cli import flags

    assert flag_table.fast_parser(for_help=True).format_help() == flags.build_parser().format_help()


def test_every_built_in_is_in_the_config_table_as_built():
    assert set(registry.BUILTIN_CONFIGS) == set(registry.BUILTIN_MODELS)
    for name, (class_name, config) in registry.BUILTIN_CONFIGS.items():
        path = registry.resolve(name)  # the real model (built once into the cache)
        assert registry.pipeline_class_name(path) == class_name, name
        built = registry.backbone_config(path)
        assert {key: built.get(key) for key in config} == config, name


def test_a_valid_launch_builds_the_model_once_before_torchrun(empty_cache, monkeypatch):
    monkeypatch.setenv("CFX_CACHE", empty_cache)
    started = []

    def fake_run(cmd, env, prog="xfuser"):
        started.append(registry.is_built("tiny-flux"))
        return 0

    monkeypatch.setattr(torchrun, "run_to_completion", fake_run)
    assert launcher.main(["--model", "tiny-flux", "--ulysses_degree", "2", "--prompt", "a cat"]) == 0
    assert started == [True]


# --------------------------------------------------------------------------------------------
# --dry-run: a missing model folder is status 3 after the whole plan
# --------------------------------------------------------------------------------------------


def test_a_dry_run_with_a_missing_model_prints_the_plan_and_exits_3(empty_cache, tmp_path):
    code, out, err = probe(["--model", str(tmp_path / "nope"), "--ulysses_degree", "2", "--dry-run"], empty_cache)
    assert code == dry_run.MODEL_MISSING == 3 and err == ""
    assert out[0] == "xfuser: dry run, nothing launched"
    assert any(line.startswith("  command      ") for line in out)
    assert out[-1].startswith(f"warning: --model '{tmp_path / 'nope'}' is neither a built-in model")


def test_a_dry_run_of_a_built_in_is_status_0_without_building_it(empty_cache):
    code, out, err = probe(["--model", "tiny-sd3", "--use_cfg_parallel", "--dry-run"], empty_cache)
    assert code == 0 and out[1] == "  model        tiny-sd3 (built-in, StableDiffusion3Pipeline)", out


def test_a_refused_dry_run_is_still_status_2(empty_cache, tmp_path):
    code, out, err = probe(["--model", str(tmp_path / "nope"), "--ulysses_degree", "0", "--dry-run"], empty_cache)
    assert code == 2 and out == [] and err.splitlines() == ["xfuser: error: --ulysses_degree 0 must be at least 1"]
