"""YAML run configs (``xfuser --config``), the dry run, and compression schedules (per layer / step)."""

from __future__ import annotations

import glob
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from compactfusion_xdit.cli import launcher, plan
from compactfusion_xdit.cli import flag_table
from compactfusion_xdit.cli import yaml_config
from compactfusion_xdit.core.config import CompressionConfig
from compactfusion_xdit.models import tiny
from compactfusion_xdit.core.residual import MessageKind, ResidualState
from compactfusion_xdit.core.schedule import format_schedule, parse_schedule
from compactfusion_xdit.testing import run_ranks
from compactfusion_xdit.testing.targets import xfuser_command

HERE = os.path.abspath(__file__)
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "*.yaml")))
QUICK = 120
LAUNCH = 400


@pytest.fixture
def env_cache(model_cache, monkeypatch) -> str:
    monkeypatch.setenv("CFX_CACHE", model_cache)
    return model_cache


def write(tmp_path, text: str) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return str(path)


def error_line(argv: list[str], capsys) -> str:
    """Run the launcher in this process; it must refuse with exit 2 and one ``xfuser: error:`` line."""
    assert launcher.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("xfuser: error: "), err
    return err[0]


# --------------------------------------------------------------------------------------------
# Every flag is a key; the xfuser flag snapshot is the installed xfuser's
# --------------------------------------------------------------------------------------------


def test_xfuser_flag_snapshot_matches_the_installed_xfuser():
    from compactfusion_xdit.cli.xfuser_flags import XFUSER_FLAGS

    assert flag_table.live_xfuser_flags() == XFUSER_FLAGS  # regenerate: python -m compactfusion_xdit.cli.flag_table


def test_every_flag_of_the_command_is_a_key_of_exactly_one_section():
    known = yaml_config.schema()
    dests = [key.action.dest for keys in known.values() for key in keys.values()]
    parser_dests = {a.dest for _, a in flag_table.grouped_actions(flag_table.fast_parser())} - {"config", "dry_run"}
    assert sorted(dests) == sorted(parser_dests)  # each once
    assert {"ulysses_degree", "ring_degree", "pipefusion_parallel_degree", "num_pipeline_patch", "use_cfg_parallel",
            "data_parallel_degree", "patch_parallel_degree", "step_parallel_degree"} <= set(known["parallel"])
    assert {"height", "width", "num_inference_steps", "prompt", "seed"} <= set(known["input"])
    assert {"dtype", "output_dir", "output_type", "warmup_steps"} <= set(known["runtime"])
    assert {"codec", "warmup", "paths", "error_feedback", "check", "stats", "schedule", "auto_floor",
            "auto_every", "scope"} == set(known["compression"])
    assert {"nproc_per_node", "master_port"} <= set(known["launcher"])


# --------------------------------------------------------------------------------------------
# Shipped configs: each passes a dry run (parse, validate, layout)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", CONFIGS, ids=[os.path.basename(p) for p in CONFIGS])
def test_every_shipped_config_passes_a_dry_run(path, env_cache, capsys):
    import yaml

    from compactfusion_xdit.cli import dry_run

    data = yaml.safe_load(open(path))
    model = data["model"]
    status = launcher.main(["--config", path, "--dry-run"])
    out = capsys.readouterr().out
    assert out.startswith("xfuser: dry run, nothing launched")  # the whole plan, whatever the status
    assert f"  ranks        {data['parallel']['world_size']} (" in out
    assert "  command      " in out
    if model in tiny.BUILTIN_MODELS:
        assert status == 0 and "warning" not in out
    else:  # placeholder path: the plan, a warning line last, and the dry run's own non-zero status
        assert status == dry_run.MODEL_MISSING == 3
        assert out.rstrip().splitlines()[-1].startswith(f"warning: --model {model!r} is neither a built-in model")
    if data["parallel"].get("ulysses_degree", 1) > 1:
        assert "  ulysses      [0," in out


def test_a_placeholder_model_path_stops_a_real_launch(env_cache, capsys):
    line = error_line(["--config", os.path.join(REPO, "configs", "flux-2gpu-ulysses.yaml")], capsys)
    assert "'/path/to/FLUX.1-dev' is neither a built-in model" in line


def test_the_dry_run_prints_xfusers_groups_for_a_hybrid_layout(env_cache, capsys):
    # SD3: Flux has no CFG branch, and the dry run runs the same usage checks as a launch
    assert launcher.main(["--model", "tiny-sd3", "--ulysses_degree", "2", "--ring_degree", "2", "--use_cfg_parallel",
                     "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "  ranks        8 (" in out
    assert "  ulysses      [0,1] [2,3] [4,5] [6,7]" in out
    assert "  ring         [0,2] [1,3] [4,6] [5,7]" in out
    assert "  cfg          [0,4] [1,5] [2,6] [3,7]" in out


# --------------------------------------------------------------------------------------------
# Command-line flags override the file
# --------------------------------------------------------------------------------------------


def test_command_line_flags_replace_the_files_settings(tmp_path):
    path = write(tmp_path, "model: tiny-flux\nparallel: {ulysses_degree: 2}\n"
                           "input: {prompt: a cat, num_inference_steps: 8, height: 64}\n"
                           "compression: {codec: residual-int4, error_feedback: false}\n")
    argv = yaml_config.expand_argv(["--config", path, "--num-inference-steps", "3", "--prompt", "a", "dog",
                                    "--compression=residual-int2"])
    assert argv.count("--prompt") + sum(a.startswith("--prompt=") for a in argv) == 1  # one request, not two
    assert not any(a.startswith("--num_inference_steps=") for a in argv)
    ns = flag_table.fast_parser().parse_args(plan.normalise_flag_names(argv))
    assert (ns.num_inference_steps, ns.prompt, ns.compression) == (3, ["a", "dog"], "residual-int2")
    assert (ns.ulysses_degree, ns.height, ns.compression_no_ef) == (2, 64, True)  # from the file


def test_a_dry_run_shows_the_overridden_values(env_cache, capsys):
    path = os.path.join(REPO, "configs", "tiny-flux-cpu.yaml")
    assert launcher.main(["--config", path, "--num_inference_steps", "3", "--compression", "residual-1bit", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "64x64, 3 steps" in out and "compression  residual-1bit" in out


def test_without_config_the_command_line_is_unchanged():
    argv = ["--model", "tiny-flux", "--prompt", "a", "b"]
    assert yaml_config.expand_argv(argv) == argv


# --------------------------------------------------------------------------------------------
# Errors: one line, exit 2, naming the key and what is allowed
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("model: tiny-flux\nparallel: {ulysess_degree: 2}\n",
     "parallel.ulysess_degree: unknown key; did you mean 'ulysses_degree'?"),
    ("model: tiny-flux\nruntime: {height: 64}\n", "runtime.height: unknown key; it belongs in the input section"),
    ("model: tiny-flux\nparalel: {ulysses_degree: 2}\n", "unknown section 'paralel'; did you mean 'parallel'?"),
    ("model: tiny-flux\nparallel: {ulysses_degree: two}\n", "parallel.ulysses_degree: expected an integer, got 'two'"),
    ("model: tiny-flux\nparallel: {use_cfg_parallel: 2}\n", "parallel.use_cfg_parallel: expected true or false, got 2"),
    ("model: tiny-flux\ninput: {height: [64, 64]}\n", "input.height: expected an integer, got [64, 64]"),
    ("model: tiny-flux\nruntime: {dtype: float64}\n",
     "runtime.dtype: 'float64' is not allowed; choose one of float32, fp32, float16, fp16, bfloat16, bf16"),
    ("model: tiny-flux\nparallel: {world_size: 4, ulysses_degree: 2}\n",
     "parallel.world_size: 4 ranks do not fit the degrees, which multiply to 2 (ulysses_degree 2)"),
    ("model: tiny-flux\ncompression: {codec: residual-int3}\n", "compression.codec: unknown compression 'residual-int3'"),
    ("model: tiny-flux\ncompression:\n  codec: residual-int4\n  schedule:\n    - {steps: 0-1, codec: none}\n"
     "    - {layers: 4-, codec: residual-int3}\n",
     "compression.schedule: schedule rule 1 (layers=4-:residual-int3): unknown compression 'residual-int3'"),
    ("model: tiny-flux\ncompression:\n  schedule: [{layer: 3, codec: int4}]\n",
     "compression.schedule: schedule rule 0: unknown key 'layer'; a rule has steps, layers, paths, codec"),
    ("model: tiny-flux\ncompression: {paths: [ulysses, warp]}\n", "compression.paths: unknown compression path(s) ['warp']"),
    ("model: tiny-flux\nparallel:\n  ulysses_degree: 2\n ring_degree: 2\n", "line 4, column 2: invalid YAML"),
    ("- just\n- a list\n", "expected sections (model, parallel, input, runtime, compression, launcher)"),
])
def test_bad_config_is_one_error_line_naming_the_key(text, expected, tmp_path, capsys):
    path = write(tmp_path, text)
    line = error_line(["--config", path], capsys)
    assert f"xfuser: error: {path}" in line
    assert expected in line, line


def test_missing_config_file(tmp_path, capsys):
    line = error_line(["--config", str(tmp_path / "nope.yaml")], capsys)
    assert "cannot read config" in line and "nope.yaml" in line


def test_config_errors_come_before_xfuser_is_imported(tmp_path, model_cache):
    path = write(tmp_path, "model: tiny-flux\nparallel: {ulysses_degree: 2, ring_degre: 2}\n")
    code = ("import sys; from compactfusion_xdit.cli import launcher, plan; rc = launcher.main(sys.argv[1:]); "
            "print('xfuser imported' if 'xfuser' in sys.modules else 'xfuser not imported'); sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, "--config", path], cwd=REPO, capture_output=True, text=True,
                          timeout=QUICK, env={**os.environ, "CFX_CACHE": model_cache})
    assert proc.returncode == 2 and proc.stdout.strip() == "xfuser not imported"
    assert "parallel.ring_degre: unknown key; did you mean 'ring_degree'?" in proc.stderr


# --------------------------------------------------------------------------------------------
# Schedules: syntax and the per-message choice
# --------------------------------------------------------------------------------------------


def test_schedule_text_and_yaml_forms_agree_and_round_trip():
    text = "steps=0-1:none; layers=0-3,7:residual-int8; layers=4- paths=ulysses,ring:residual-1bit"
    from_yaml = parse_schedule([{"steps": "0-1", "codec": "none"}, {"layers": ["0-3", 7], "codec": "residual-int8"},
                                {"layers": "4-", "paths": ["ulysses", "ring"], "codec": "residual-1bit"}])
    assert parse_schedule(text) == from_yaml
    assert format_schedule(from_yaml) == text
    assert parse_schedule(format_schedule(from_yaml)) == from_yaml


def test_first_matching_rule_wins_and_the_default_covers_the_rest():
    config = CompressionConfig.parse("residual-int4", schedule="steps=0-1:none; layers=0-3:residual-int8; "
                                     "layers=4- paths=ulysses:residual-1bit; paths=pipefusion:plain-int2")
    assert config.choice("ulysses", 9, 0) == ("none", "none")
    assert config.choice("ulysses", 2, 5) == ("residual", "int8")
    assert config.choice("ulysses", 4, 5) == ("residual", "1bit")
    assert config.choice("ring", 4, 5) == ("residual", "int4")
    assert config.choice("pipefusion", None, 5) == ("plain", "int2")  # PipeFusion keys carry no layer
    assert config.choice("step", None, 5) == ("residual", "int4")


def test_a_schedule_can_switch_compression_on_for_one_path_only():
    config = CompressionConfig.parse("none", schedule="paths=ring:residual-int4")
    assert config.enabled and config.compresses("ring") and not config.compresses("ulysses")


def test_layer_comes_from_the_keys_of_each_path():
    state = ResidualState(CompressionConfig.parse("none", warmup=0, schedule="layers=3:residual-int4"))
    coded = lambda key: state.message_kind(key, (4, 8), torch.float32) is MessageKind.CODED  # noqa: E731
    assert coded(("ulysses", 3, "q")) and not coded(("ulysses", 2, "q"))
    assert coded(("ring", -1, 3)) and not coded(("ring", 3, 0))  # ring keys: (path, patch, layer)
    assert coded(("legacy", 3, "k")) and coded(("patch", 3, "v"))
    assert not coded(("pipefusion", "latent", 3)) and not coded(("step", 3))


def test_a_raw_step_seeds_the_cache_only_before_a_residual_step():
    state = ResidualState(CompressionConfig.parse("residual-int4", warmup=0, schedule="steps=0-2:none; steps=4:none"))
    kinds = []
    for step in range(6):
        state.set_step(step)
        kinds.append(state.message_kind(("ulysses", 0, "k"), (4, 8), torch.float32).value)
    assert kinds == ["raw", "raw", "seed", "coded", "seed", "coded"]


def test_no_ef_applies_to_the_schedules_residual_names():
    from compactfusion_xdit.cli import flags as args

    ns = flag_table.fast_parser().parse_args(["--compression-schedule", "layers=0:residual-int8", "--compression-no-ef"])
    config = args.compression_config(ns)
    assert config.error_feedback is False and config.choice("ulysses", 0, 3) == ("residual", "int8")


def test_a_per_rule_noef_is_refused():
    with pytest.raises(ValueError, match="error feedback is one setting for the whole config"):
        CompressionConfig.parse("residual-int4", schedule="layers=0:residual-int8-noef")


# --------------------------------------------------------------------------------------------
# Schedules on two ranks: bytes per message and bitwise caches while the codec changes
# --------------------------------------------------------------------------------------------

SCHEDULE = ("steps=0-1:none; layers=0 steps=4:none; layers=0:residual-int8; layers=1 steps=2-3:residual-int8; "
            "layers=1 steps=5:int4; layers=1:residual-1bit")
#: The codec the schedule above gives (layer, step), written out by hand; the default is residual-int4.
EXPECTED = {
    0: ["none", "none", "residual-int8", "residual-int8", "none", "residual-int8", "residual-int8"],
    1: ["none", "none", "residual-int8", "residual-int8", "residual-1bit", "int4", "residual-1bit"],
    2: ["none", "none"] + ["residual-int4"] * 5,
}
ROWS, COLS, STEPS = 6, 24, 7


def scheduled_exchanges(rank: int, world_size: int, schedule: str):
    """All-to-all (Ulysses keys) and ring exchange (ring keys) of 3 layers over 7 steps; per message
    the kind, the bytes sent, and whether the tensor arrived exactly; the cache check after each step."""
    from compactfusion_xdit.comm import CompressedCommunicator

    state = ResidualState(CompressionConfig.parse("residual-int4", warmup=0, schedule=schedule))
    comm = CompressedCommunicator(state)
    state.begin_request()
    log, checks = [], []
    gen = torch.Generator().manual_seed(rank)
    base = torch.randn(world_size * ROWS, COLS, generator=gen)
    for step in range(STEPS):
        state.set_step(step)
        for layer in range(3):
            x = base * (1 + 0.1 * layer) + 0.05 * step * torch.cos(base + layer)
            for key, run in ((("ulysses", layer, "k"), lambda k, t: comm.all_to_all(k, t)),
                             (("ring", -1, layer), lambda k, t: [kv for _, kv in comm.ring_exchange(k, (t,))])):
                chunk = (ROWS, COLS) if key[0] == "ulysses" else tuple(x.shape)
                kind = state.message_kind(key, chunk, x.dtype).value
                before = state.stats()["paths"].get(key[0], {}).get("sent_bytes", 0)
                run(key, x)
                sent = state.stats()["paths"][key[0]]["sent_bytes"] - before
                log.append((key[0], layer, step, kind, sent, chunk))
        checks.append(comm.cache_mismatches())
    return {"log": log, "checks": checks, "reseeds": state.stats()["reseeds"]}


def wire_bytes(name: str, shape) -> int:
    rows, cols = shape
    if name == "none":
        return rows * cols * 4
    codec = name.removeprefix("residual-")
    data = {"int8": cols, "int4": -(-cols // 2), "1bit": -(-cols // 8)}[codec] * rows  # docs/codec_format.md
    scales = 2 * rows + (2 * cols if codec == "1bit" else 0)
    return data + scales


@pytest.fixture(scope="module")
def exchanges():
    return run_ranks(f"{HERE}:scheduled_exchanges", world_size=2, kwargs={"schedule": SCHEDULE},
                     timeout=QUICK)


def test_caches_stay_bitwise_equal_while_the_codec_changes_per_step_and_layer(exchanges):
    for rank in exchanges:
        assert rank["checks"] == [[]] * STEPS
        assert rank["reseeds"] == 0  # codec changes need no re-seeding: caches hold reconstructions


def test_every_message_uses_the_scheduled_codec_and_its_exact_bytes(exchanges):
    for rank in exchanges:
        for path, layer, step, kind, sent, chunk in rank["log"]:
            name = EXPECTED[layer][step]
            if name == "none":
                next_residual = step + 1 < STEPS and EXPECTED[layer][step + 1].startswith("residual-")
                assert kind == ("seed" if next_residual else "raw"), (path, layer, step)
            else:
                assert kind == "coded", (path, layer, step)
            assert sent == wire_bytes(name, chunk), (path, layer, step, name)  # raw steps: exactly the raw bytes


# --------------------------------------------------------------------------------------------
# End to end: the shipped CPU demo config, with command-line overrides and a schedule
# --------------------------------------------------------------------------------------------


def test_the_cpu_demo_config_runs_end_to_end_with_a_schedule(model_cache, tmp_path):
    from PIL import Image

    out = tmp_path / "out"
    schedule = "steps=0:none; layers=0-1:residual-int8; layers=2-:residual-1bit"
    proc = subprocess.run(
        [*xfuser_command(), "--config", "configs/tiny-flux-cpu.yaml", "--output_dir", str(out),
                            "--num_inference_steps", "3", "--compression-schedule", schedule, "--compression-check"],
        cwd=REPO, env={**os.environ, "CFX_CACHE": model_cache, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
        timeout=LAUNCH)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with Image.open(out / "image_0.png") as image:
        assert image.size == (64, 64)  # from the file
    stats = json.loads((out / "stats.json").read_text())
    assert stats["num_inference_steps"] == 3 and stats["world_size"] == 2  # override / file
    assert stats["compression"] == "residual-int4"
    assert stats["compression_config"]["schedule"] == [str(r) for r in parse_schedule(schedule)]
    assert stats["cache_consistent"] is True  # every step, across both ranks
    ulysses = stats["paths"]["ulysses"]
    assert 0 < ulysses["sent_bytes"] < ulysses["raw_bytes"]
    assert math.isclose(stats["ratio"], stats["raw_bytes"] / stats["sent_bytes"])


# --------------------------------------------------------------------------------------------
# The shipped schedule config on tiny Flux (Ulysses 2): every message's codec, kind and bytes
# --------------------------------------------------------------------------------------------

SCHEDULE_CONFIG = os.path.join(REPO, "configs", "tiny-flux-schedule-cpu.yaml")
SCHEDULE_STEPS = 4


def recorded_schedule_run(rank: int, world_size: int, argv: list[str]):
    """One request of the worker with every Ulysses all-to-all recorded: (key, chunk, step, kind)."""
    import torch.distributed as dist

    from compactfusion_xdit import patches
    from compactfusion_xdit.rank import worker
    from compactfusion_xdit.comm import communicator

    args = worker.parse_args(argv)
    loaded = worker.load_pipeline(args)
    session = patches.session()
    messages = []
    all_to_all_many = communicator.CompressedCommunicator.all_to_all_many  # all_to_all goes through it

    def recording(self, keys, xs, group=None, async_op=False):
        world = dist.get_world_size(self._group(group))
        for key, x in zip(keys, xs):
            chunk = (x.shape[0] // world, *x.shape[1:])
            messages.append((key, chunk, self.state.step, self.state.message_kind(key, chunk, x.dtype).value, world))
        return all_to_all_many(self, keys, xs, group, async_op)

    communicator.CompressedCommunicator.all_to_all_many = recording
    session.state.reset_stats()
    worker.call_pipeline(loaded, args)
    return {"messages": messages, "stats": session.stats(), "mismatches": session.check_caches(None)}


@pytest.mark.slow
def test_the_shipped_schedule_config_codes_each_message_as_scheduled(model_cache):
    argv = yaml_config.expand_argv(["--config", SCHEDULE_CONFIG, "--num_inference_steps", str(SCHEDULE_STEPS),
                                    "--output_type", "latent"])
    per_rank = run_ranks(f"{HERE}:recorded_schedule_run", 2, {"argv": argv}, timeout=LAUNCH,
                         init_process_group=False, env={"CFX_CACHE": model_cache})
    for out in per_rank:
        assert out["mismatches"] == []
        expected_raw = expected_sent = 0
        for key, chunk, step, kind, world in out["messages"]:
            layer = key[1]
            # the file: steps 0-1 none; layers 0-1 residual-int8; layers 2- residual-1bit (warmup 0)
            name = "none" if step <= 1 else "residual-int8" if layer <= 1 else "residual-1bit"
            assert kind == {0: "raw", 1: "seed"}.get(step, "coded"), (key, step)
            rows, cols = math.prod(chunk[:-1]), chunk[-1]
            expected_raw += (world - 1) * rows * cols * 4
            expected_sent += (world - 1) * wire_bytes(name, (rows, cols))
        steps = {m[2] for m in out["messages"]}
        assert steps == set(range(SCHEDULE_STEPS)) and {m[0][1] for m in out["messages"]} >= {0, 1, 2}
        ulysses = out["stats"]["paths"]["ulysses"]
        assert (ulysses["raw_bytes"], ulysses["sent_bytes"]) == (expected_raw, expected_sent)
        assert out["stats"]["reseeds"] == 0
