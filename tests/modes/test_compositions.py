"""The modes composed with xfuser's parallelism, CI-sized: one 2-rank launch of the references and
one 4-rank launch of the compositions (the slow tests in test_patch_parallel.py and
test_step_parallel.py run the same checks at 64x64 and 8 steps).

* step 2 x Ulysses 2, step 2 x ring 2 (tiny-flux) equal step 2 alone;
* step 2 x CFG parallel (tiny-sd3) equals step 2 alone (each CFG pair skips the transformer together);
* patch 2 (sync) x CFG parallel (tiny-sd3) equals patch 2 alone, which equals one process (other tests).

All within fp32 round-off (the slow twins measured 5e-7 .. 1.4e-6).
"""

from __future__ import annotations

import pytest

from compactfusion_xdit.testing import free_port, run_ranks

WORKER_RUNS = "compactfusion_xdit.testing.targets:worker_runs"
TIMEOUT = 480.0  # a bound against hangs; CI machines may be loaded
ROUND_OFF = 1e-4


def argv(model: str, *flags: str) -> list[str]:
    extra = ["--guidance_scale", "5.0"] if model == "tiny-sd3" else []
    return ["--model", model, "--height", "32", "--width", "32", "--num_inference_steps", "4", "--prompt", "a cat",
            "--max_sequence_length", "16", "--seed", "42", "--output_type", "latent", *extra, *flags]


STEP = ("--step_parallel_degree", "2", "--step_parallel_warmup", "2")
PATCH = ("--patch_parallel_degree", "2", "--patch_parallel_mode", "sync")
#: name -> (the composition on 4 ranks, its reference on 2 ranks)
CASES = {
    "step x ulysses": (argv("tiny-flux", *STEP, "--ulysses_degree", "2"), argv("tiny-flux", *STEP)),
    "step x ring": (argv("tiny-flux", *STEP, "--ring_degree", "2"), argv("tiny-flux", *STEP)),
    "step x cfg": (argv("tiny-sd3", *STEP, "--use_cfg_parallel"), argv("tiny-sd3", *STEP)),
    "patch x cfg": (argv("tiny-sd3", *PATCH, "--use_cfg_parallel"), argv("tiny-sd3", *PATCH)),
}


@pytest.fixture(scope="module")
def latents() -> dict[str, tuple]:
    """name -> (composed latents, reference latents): the last rank's output of each run."""
    references = list(dict.fromkeys(tuple(ref) for _, ref in CASES.values()))
    ref_out = run_ranks(WORKER_RUNS, 2, {"runs": [list(r) for r in references], "ports": [free_port() for _ in references]},
                        timeout=TIMEOUT, init_process_group=False)[-1]
    by_ref = {r: out for r, (out, _) in zip(references, ref_out)}
    composed = [c for c, _ in CASES.values()]
    out = run_ranks(WORKER_RUNS, 4, {"runs": composed, "ports": [free_port() for _ in composed]},
                    timeout=TIMEOUT, init_process_group=False)[-1]
    return {name: (got, by_ref[tuple(ref)]) for (name, (_, ref)), (got, _) in zip(CASES.items(), out)}


@pytest.mark.parametrize("name", list(CASES))
def test_the_composition_equals_the_mode_alone(latents, name):
    got, reference = latents[name]
    assert got is not None and got.shape == reference.shape
    assert (got - reference).abs().max().item() <= ROUND_OFF * max(1.0, reference.abs().max().item())
