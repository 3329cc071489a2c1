"""The GPU modes' plumbing run on CPU (run.device=cpu): colocated (serving buffer mapped by handle, hidden
states by handle) and split (weights broadcast and hidden states sent over gloo standing in for NCCL), with
replicas, against the cpu mode's run of the same seed: every step's metrics must be the cpu run's, so the weights
and the teacher's hidden states are checked on arrival."""

import pytest

from opd.metrics import read_jsonl

from test_driver import _run

COMPARED = ("loss", "kl/forward/mean", "kl/reverse/mean", "entropy/student/mean", "grad/norm",
            "response/tokens/sum")
EVAL_COMPARED = ("eval/kl/reverse/mean", "eval/kl/forward/mean", "eval/accuracy/student", "eval/accuracy/teacher")
# Two rollout replicas everywhere: replica i samples its share of the prompts with seed + i, so a run with two
# replicas draws the same tokens in every mode. Micro-batches of a few sequences, so that two teachers each send
# several parts (part k comes from teacher k % 2) and the learner takes them one at a time.
REPLICAS = ("--set", "run.rollout_replicas=2", "--set", "learner.micro_batch_tokens=40",
            "--set", "teacher.micro_batch_tokens=64")


@pytest.fixture(scope="module")
def cpu_run(root, tmp_path_factory):
    run_dir, _ = _run(root, tmp_path_factory.mktemp("cpu"), *REPLICAS, name="cpu")
    return read_jsonl(run_dir / "metrics.jsonl"), read_jsonl(run_dir / "eval.jsonl")


def _same_as_cpu(run_dir, cpu_run) -> list[dict]:
    steps, evals = read_jsonl(run_dir / "metrics.jsonl"), read_jsonl(run_dir / "eval.jsonl")
    want_steps, want_evals = cpu_run
    for got, want in zip(steps, want_steps, strict=True):
        for key in COMPARED:
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), (got["step"], key)
        assert got["logprob/learner_minus_rollout/absmax"] < 1e-4
        assert got["learner/micro_batches"] == want["learner/micro_batches"] >= 4
    for got, want in zip(evals, want_evals, strict=True):
        for key in EVAL_COMPARED:
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), (got["step"], key)
    return steps


@pytest.mark.slow
def test_split_mode_with_two_teachers_reproduces_the_cpu_run(root, tmp_path, cpu_run):
    """Same seed, same fp32 weights: every step's metrics equal the cpu mode's, so the broadcast delivered every
    parameter and the two teachers' hidden states arrived in order."""
    run_dir, _ = _run(root, tmp_path, "--mode", "split", "--set", "run.device=cpu", "--set", "run.teacher_replicas=2",
                      *REPLICAS, "--set", "run.cpus_per_actor=0.25", name="split")
    steps = _same_as_cpu(run_dir, cpu_run)
    assert all(r["sync/policy_lag"] == 0 for r in steps)


@pytest.mark.slow
def test_colocated_mode_with_replicas_reproduces_the_cpu_run(root, tmp_path, cpu_run):
    """Two rollout replicas map the learner's serving buffer by handle and each sample half the prompts; two
    teachers hand their hidden states over by handle. Every step's metrics equal the cpu mode's: the serving
    buffer held the learner's weights and the hidden states arrived whole and in order."""
    run_dir, _ = _run(root, tmp_path, "--mode", "colocated", "--set", "run.device=cpu", *REPLICAS,
                      "--set", "run.teacher_replicas=2", "--set", "run.cpus_per_actor=0.25", name="colo")
    steps = _same_as_cpu(run_dir, cpu_run)
    assert [r["policy/version"] for r in steps] == [1.0, 2.0, 3.0]
    assert all(r["response/tokens/sum"] >= 16 for r in steps)  # all 16 prompts answered, by two replicas


@pytest.mark.slow
def test_split_overlap_samples_one_step_behind(root, tmp_path):
    run_dir, _ = _run(root, tmp_path, "--mode", "split", "--set", "run.device=cpu", "--set", "run.overlap=true",
                      "--set", "run.rollout_replicas=2", "--set", "run.cpus_per_actor=0.25", name="overlap")
    steps = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["sync/policy_lag"] for r in steps] == [0.0, 1.0, 1.0]  # step k+1 sampled while k trained
    assert [r["policy/version"] for r in steps] == [1.0, 2.0, 3.0]
    # the first batch is on-policy; the later ones were sampled by the previous weights, which the canary sees
    assert steps[0]["logprob/learner_minus_rollout/absmax"] < 1e-4
    assert steps[1]["logprob/learner_minus_rollout/absmax"] > 1e-3
