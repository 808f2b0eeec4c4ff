"""Inputs fuzzed: any command line over the real flag set, and any YAML config, ends in either an
accepted dry run (exit 0, or 3 when the model folder does not exist; nothing launched) or exactly one
``xfuser: error:`` line with exit 2 -- never a traceback. The flag set is `flag_table.fast_parser()`: our flags plus xfuser 0.7.0's, the
snapshot tests/cli/test_yaml_config.py keeps equal to ``args.build_parser()``."""

from __future__ import annotations

import argparse
import contextlib
import io
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compactfusion_xdit.cli import launcher
from compactfusion_xdit.cli import flag_table

SKIP = {"help", "config", "dry_run"}  # -h prints help; --config and --dry-run are added by the tests
JUNK = st.one_of(st.text(max_size=12), st.sampled_from(["-1", "0", "1e9", "nan", "--", "", " ", "none", "all", "x,y",
                                                          "residual-", "lowrank-0", "2.5", "99999999999999999999"]))


@pytest.fixture(scope="module", autouse=True)
def tiny_models():
    from compactfusion_xdit.models import tiny

    tiny.materialize("tiny-flux")  # the dry run reads its config; built once, not per example


def _actions() -> list[argparse.Action]:
    return [a for _, a in flag_table.grouped_actions(flag_table.fast_parser()) if a.dest not in SKIP and a.option_strings]


ACTIONS = _actions()


@st.composite
def flag(draw, action: argparse.Action) -> list[str]:
    name = draw(st.sampled_from(action.option_strings))
    if draw(st.integers(0, 9)) == 0:  # sometimes the dashed spelling of an underscored flag
        name = "--" + name[2:].replace("_", "-")
    if action.nargs == 0:
        return [name]
    if action.choices is not None and draw(st.booleans()):
        value = str(draw(st.sampled_from(list(action.choices))))
    elif action.type is int and draw(st.booleans()):
        value = str(draw(st.integers(-3, 9)))
    elif action.type is float and draw(st.booleans()):
        value = str(draw(st.floats(allow_nan=True, allow_infinity=True)))
    else:
        value = draw(JUNK)
    count = draw(st.integers(0, 2)) if action.nargs in ("*", "+") else 1
    return [name] + [value] * count


@st.composite
def command_lines(draw) -> list[str]:
    argv = ["--model", draw(st.sampled_from(["tiny-flux", "tiny-pixart", "no/such/folder"]))] if draw(st.booleans()) else []
    for action in draw(st.lists(st.sampled_from(ACTIONS), max_size=6)):
        argv += draw(flag(action))
    return argv


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = launcher.main(argv)
        except SystemExit as exit_:  # argparse-style exits count as what they are
            code = exit_.code
    return code, out.getvalue(), err.getvalue()


def assert_one_clear_outcome(argv: list[str], code: int, out: str, err: str) -> None:
    if code in (0, 3):  # 3: the checks passed but the model folder does not exist (a warning line ends the plan)
        assert out.startswith("xfuser: dry run, nothing launched"), (argv, out, err)
        assert (code == 3) == out.rstrip().splitlines()[-1].startswith("warning: --model "), (argv, code, out)
    else:
        lines = [line for line in err.splitlines() if line.strip() and not line.startswith("xfuser: building")]
        assert code == 2 and len(lines) == 1 and lines[0].startswith("xfuser: error: "), (argv, code, err)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(argv=command_lines())
def test_any_command_line_is_a_dry_run_or_one_error_line(argv):
    code, out, err = run_cli(argv + ["--dry-run"])  # an exception escaping here is the traceback users would see
    assert_one_clear_outcome(argv, code, out, err)


def test_a_value_the_ranks_would_refuse_is_refused_by_the_launcher():
    """Without --dry-run the launcher checks every flag before starting ranks (none is started here)."""
    code, out, err = run_cli(["--model", "tiny-flux", "--num_inference_steps", "many"])
    assert code == 2 and err.startswith("xfuser: error: ") and "--num_inference_steps" in err, err


YAML_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-5, 10), st.floats(allow_nan=True), st.text(max_size=8))
SECTIONS = ["model", "parallel", "input", "runtime", "compression", "launcher", "nonsense"]


@st.composite
def yaml_configs(draw) -> str:
    import yaml

    known = {"parallel": ["ulysses_degree", "ring_degree", "world_size", "pipefusion_parallel_degree", "junk"],
             "input": ["height", "width", "num_inference_steps", "prompt", "seed", "junk"],
             "runtime": ["dtype", "output_dir", "output_type", "junk"],
             "compression": ["codec", "warmup", "paths", "error_feedback", "schedule", "check", "junk"],
             "launcher": ["nnodes", "master_port", "junk"]}
    data: dict = {}
    for section in draw(st.lists(st.sampled_from(SECTIONS), max_size=5, unique=True)):
        if section == "model":
            data["model"] = draw(st.one_of(st.sampled_from(["tiny-flux", "missing/folder"]), YAML_SCALARS))
        elif section == "nonsense" or draw(st.integers(0, 6)) == 0:
            data[section] = draw(YAML_SCALARS)
        else:
            keys = draw(st.lists(st.sampled_from(known[section]), max_size=4, unique=True))
            data[section] = {k: draw(st.one_of(YAML_SCALARS, st.lists(YAML_SCALARS, max_size=3))) for k in keys}
    text = yaml.safe_dump(data)
    if draw(st.integers(0, 9)) == 0:  # sometimes not YAML at all
        text = text[: draw(st.integers(0, len(text)))] + draw(st.sampled_from([": :", "\t-", "{", "]", "'"]))
    return text


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(text=yaml_configs())
def test_any_yaml_config_is_a_dry_run_or_one_error_line(tmp_path, text):
    path = tmp_path / "fuzz.yaml"
    path.write_text(text)
    code, out, err = run_cli(["--config", str(path), "--dry-run"])
    assert_one_clear_outcome([text], code, out, err)


def test_the_shipped_configs_dry_run_cleanly():
    root = os.path.join(os.path.dirname(__file__), "..", "..", "configs")
    for name in sorted(os.listdir(root)):
        if name.endswith(".yaml"):
            code, out, err = run_cli(["--config", os.path.join(root, name), "--dry-run"])
            assert code in (0, 3) and not err, (name, err)  # 3: a real model's placeholder path
            assert out.startswith("xfuser: dry run, nothing launched"), (name, out)
            assert (code == 3) == ("model: /path/to/" in open(os.path.join(root, name)).read()), (name, code)


def test_a_dry_run_of_a_huge_world_answers_at_once_without_listing_groups():
    """A hypothesis run found it: listing xfuser's groups of a million ranks took minutes and GBs."""
    import time

    start = time.monotonic()
    code, out, err = run_cli(["--model", "tiny-flux", "--ring_degree", "1024", "--data_parallel_degree", "1024",
                              "--dry-run"])
    assert time.monotonic() - start < 10, "the dry run enumerated the groups"
    assert code == 0, (out, err)
    assert "ranks        1048576 " in out and "groups       (not listed above 512 ranks)" in out, out
