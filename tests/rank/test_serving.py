"""Many requests through one launch (``--prompt_file`` / repeated ``--prompt``; issue 9 item 1).

Two Ulysses ranks (gloo) on tiny-flux serve a list of requests with mixed resolutions, step counts
and seeds through one process group with ``residual-int4``. Each output must equal, bitwise, the
output of the same request in a second launch that serves the list in reverse order: every request
then has other predecessors, and the first of each launch runs on fresh state, as if alone (a
fresh process group per request inside one process is not possible: gloo cannot re-form its mesh).
No residual cache survives its request; resident memory stays bounded.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from compactfusion_xdit.rank import requests as request_list
from compactfusion_xdit.testing import run_ranks

HERE = os.path.abspath(__file__)
TIMEOUT = 240.0
ARGV = ["--model", "tiny-flux", "--ulysses_degree", "2", "--height", "32", "--width", "32", "--num_inference_steps", "2",
        "--prompt", "a cat", "--max_sequence_length", "16", "--seed", "42", "--output_type", "latent",
        "--compression", "residual-int4", "--compression-warmup", "1"]

#: Mixed sizes, steps and seeds; the 3rd repeats the 1st (same request later in the stream).
REQUESTS = [
    request_list.Request("a cat", height=32, width=32, num_inference_steps=3, seed=1),
    request_list.Request("the dog", height=64, width=32, num_inference_steps=2, seed=2),
    request_list.Request("a cat", height=32, width=32, num_inference_steps=3, seed=1),
    request_list.Request("a b c", height=32, width=64, num_inference_steps=4, seed=3),
    request_list.Request("the cat", height=64, width=64, num_inference_steps=2, seed=4),
    request_list.Request("dog", height=32, width=32, num_inference_steps=5, seed=5),
]


@pytest.fixture(scope="module", autouse=True)
def flux_cached():
    from compactfusion_xdit.models import tiny

    tiny.materialize("tiny-flux")


def serve_stream(rank: int, world_size: int, argv: list[str], requests: list):
    """Rank target: the requests through one launch; the output rank's latents and every rank's stats."""
    from compactfusion_xdit.rank import worker

    results = worker.serve(worker.parse_args(argv), requests)
    return [(r.output.clone() if r.is_output_rank else None, r.stats) for r in results]


def test_every_request_of_a_stream_equals_the_request_served_alone():
    stream = run_ranks(f"{HERE}:serve_stream", 2, {"argv": ARGV, "requests": REQUESTS},
                       timeout=TIMEOUT, init_process_group=False)
    reverse = run_ranks(f"{HERE}:serve_stream", 2, {"argv": ARGV, "requests": REQUESTS[::-1]},
                        timeout=TIMEOUT, init_process_group=False)
    last = len(stream) - 1
    alone = [reverse[r][::-1] for r in range(len(reverse))]
    for n, request in enumerate(REQUESTS):
        got, want = stream[last][n][0], alone[last][n][0]
        assert got.shape[0] == 1 and got.dtype == want.dtype
        assert torch.equal(got, want), f"request {n} differs from the same request served alone"
        stats = stream[last][n][1]
        assert (stats["height"], stats["width"], stats["num_inference_steps"], stats["seed"]) == (
            request.height, request.width, request.num_inference_steps, request.seed)
        assert stats["sent_bytes"] < stats["raw_bytes"]  # compressed, and counted per request
        assert stats["raw_bytes"] == alone[last][n][1]["raw_bytes"]
    # The repeated request is bitwise the first one (its state did not see request 1 or 2).
    assert torch.equal(stream[last][0][0], stream[last][2][0])
    for rank_results in stream:
        assert [s["cache_entries_after"] for _, s in rank_results] == [0] * len(REQUESTS)
        rss = [s["rss_bytes"] for _, s in rank_results]
        assert all(isinstance(r, int) and r > 50 << 20 for r in rss), rss  # a real reading (torch alone is larger)
        assert max(rss[2:]) <= rss[1] * 1.10, f"resident memory grew over the stream: {rss}"


def test_prompt_file_lines_and_json_lines(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a cat\n\n# a comment\n"
                    '{"prompt": "the dog", "height": 64, "steps": 3, "seed": 7}\n')
    requests = request_list.collect(["--prompt_file", str(path)], str(path), {"height": 32, "width": 48, "seed": 42,
                                                                              "num_inference_steps": 2})
    assert requests == [request_list.Request("a cat", 32, 48, 2, 42), request_list.Request("the dog", 64, 48, 3, 7)]


def test_repeated_prompt_flags_are_one_request_each():
    argv = ["--model", "m", "--prompt", "a", "cat", "--height", "32", "--prompt=the dog", "--seed", "1"]
    assert request_list.repeated_prompts(argv) == ["a cat", "the dog"]
    assert request_list.repeated_prompts(["--prompt", "a", "cat"]) == []  # one flag keeps xfuser's meaning


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "a", "height": "big"}', "'height' must be an integer >= 1"),
    ('{"prompt": "a", "size": 3}', "unknown key(s) ['size']"),
    ('{"height": 32}', "'prompt' must be a non-empty string"),
    ('{"prompt": "a"', "not valid JSON"),
])
def test_bad_prompt_file_line_names_file_line_and_field(tmp_path, line, message):
    path = tmp_path / "p.jsonl"
    path.write_text("ok\n" + line + "\n")
    with pytest.raises(request_list.RequestError) as err:
        request_list.load_prompt_file(str(path))
    assert f"{path}:2" in str(err.value) and message in str(err.value)


def test_prompt_file_and_repeated_prompts_together_are_refused(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("a\n")
    with pytest.raises(request_list.RequestError, match="use one of them"):
        request_list.collect(["--prompt", "a", "--prompt", "b"], str(path), {})


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_hundred_requests_memory_flat_and_each_equal_to_alone(tmp_path):
    """100 mixed requests in one launch: RSS after request 100 within 5 % of after request 10;
    three requests equal their lone runs (one launch each) bitwise; no cache outlives its request."""
    sizes = [(32, 32), (64, 32), (32, 64), (64, 64)]
    requests = [request_list.Request(f"a cat {chr(97 + n % 26)}", height=sizes[n % 4][0], width=sizes[n % 4][1],
                                     num_inference_steps=2 + n % 3, seed=n) for n in range(100)]
    stream = run_ranks(f"{HERE}:serve_stream", 2, {"argv": ARGV, "requests": requests},
                       timeout=1800.0, init_process_group=False)
    sample = [99, 37, 0]  # served first here: on fresh state, as if alone
    alone = [run_ranks(f"{HERE}:serve_stream", 2, {"argv": ARGV, "requests": [requests[n]]}, timeout=600.0,
                       init_process_group=False) for n in sample]
    last = len(stream) - 1
    for i, n in enumerate(sample):
        assert torch.equal(stream[last][n][0], alone[i][last][0][0])
    report = {}
    for rank, rank_results in enumerate(stream):
        assert all(s["cache_entries_after"] == 0 for _, s in rank_results)
        rss10, rss100 = rank_results[9][1]["rss_bytes"], rank_results[99][1]["rss_bytes"]
        report[rank] = {"rss_after_10": rss10, "rss_after_100": rss100, "growth": rss100 / rss10 - 1}
        assert rss100 <= rss10 * 1.05, report
    (tmp_path / "rss.json").write_text(json.dumps(report))
    print("RSS", json.dumps(report))


def test_launcher_refuses_a_bad_prompt_file_before_any_rank_starts(tmp_path):
    from compactfusion_xdit.cli import plan

    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a", "steps": 0}\n')
    with pytest.raises(plan.UsageError, match=r"p.jsonl:1: 'steps' must be an integer >= 1"):
        plan.plan_launch(plan.preparse(["--model", "tiny-flux", "--prompt_file", str(path)]))
