"""Every rank must start with the same settings: a mismatch stops all of them with one message
naming the field and the ranks (compactfusion_xdit.reliability.consistency, hooked into the worker)."""

from __future__ import annotations

import os


from compactfusion_xdit.reliability import consistency
from compactfusion_xdit.testing import run_ranks

HERE = os.path.abspath(__file__)


def test_differences_name_the_field_and_the_ranks_of_each_value():
    same = {"compression.codec": (consistency.digest("int4"), '"int4"')}
    other = {"compression.codec": (consistency.digest("int8"), '"int8"')}
    lines = consistency.differences([same, same, other])
    assert lines == ["'compression.codec' differs: \"int4\" on ranks 0, 1; \"int8\" on rank 2"]
    assert consistency.differences([same, same]) == []


def test_a_field_missing_on_one_rank_is_a_difference():
    a = {"x": (consistency.digest(1), "1")}
    assert consistency.differences([a, {}]) == ["'x' differs: 1 on rank 0; <missing> on rank 1"]


def test_run_fields_flatten_dicts_and_add_versions():
    fields = consistency.run_fields(compression={"codec": "int4", "warmup": 1}, model="tiny-flux")
    assert fields["compression.codec"] == "int4" and fields["compression.warmup"] == 1
    assert fields["model"] == "tiny-flux"
    assert {"version.compactfusion_xdit", "version.xfuser", "version.torch"} <= set(fields)


def test_digest_ignores_key_order():
    assert consistency.digest({"a": 1, "b": [2, 3]}) == consistency.digest({"b": [2, 3], "a": 1})
    assert consistency.digest({"a": 1}) != consistency.digest({"a": 2})


def check_with_one_rank_different(rank: int, world_size: int) -> str:
    """Rank 2 runs another codec and warm-up; every rank must raise the same ConfigMismatch."""
    codec, warmup = ("int8", 2) if rank == 2 else ("int4", 1)
    fields = consistency.run_fields(compression={"codec": codec, "warmup": warmup, "mode": "residual"},
                                    parallel={"ulysses": world_size})
    try:
        consistency.check_ranks(fields)
    except consistency.ConfigMismatch as err:
        return str(err)
    return "no error"


def check_all_equal(rank: int, world_size: int) -> str:
    consistency.check_ranks(consistency.run_fields(compression={"codec": "int4"}, parallel={"ulysses": world_size}))
    return "ok"


def test_every_rank_stops_with_the_same_message_naming_fields_and_ranks():
    messages = run_ranks(f"{HERE}:check_with_one_rank_different", 3, timeout=90)
    assert len(set(messages)) == 1, messages
    text = messages[0]
    assert "'compression.codec' differs: \"int4\" on ranks 0, 1; \"int8\" on rank 2" in text
    assert "'compression.warmup' differs: 1 on ranks 0, 1; 2 on rank 2" in text
    assert "'compression.mode'" not in text and "'parallel." not in text and "'version." not in text
    assert run_ranks(f"{HERE}:check_all_equal", 2, timeout=90) == ["ok", "ok"]


def worker_main_capturing(rank: int, world_size: int, argvs: list[list[str]]) -> tuple[int, str]:
    """``worker.main`` with this rank's own flags; returns (exit status, stderr)."""
    import contextlib
    import io

    from compactfusion_xdit.rank import worker

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = worker.main(argvs[rank])
    return code, err.getvalue()


def test_worker_refuses_ranks_started_with_different_compression(tmp_path):
    """The worker compares before the model is built: exit 2 on every rank, one line naming the field."""
    from compactfusion_xdit.models import tiny

    tiny.materialize("tiny-flux")
    base = ["--model", "tiny-flux", "--height", "32", "--width", "32", "--num_inference_steps", "2",
            "--prompt", "a cat", "--max_sequence_length", "16", "--output_type", "latent",
            "--ulysses_degree", "2", "--output_dir", str(tmp_path)]
    argvs = [base + ["--compression", "residual-int4"], base + ["--compression", "residual-1bit"]]
    results = run_ranks(f"{HERE}:worker_main_capturing", 2, {"argvs": argvs}, timeout=240, init_process_group=False)
    for code, err in results:
        assert code == 2, err
        lines = [line for line in err.splitlines() if line.startswith("error")]
        assert len(lines) == 1, err
        assert "'compression.codec' differs: \"int4\" on rank 0; \"1bit\" on rank 1" in lines[0]
        assert "'compression.name' differs" in lines[0]
        assert "Traceback" not in err
    assert not os.listdir(tmp_path)  # nothing was run or written
