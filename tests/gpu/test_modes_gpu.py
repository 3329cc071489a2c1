"""colocated mode on a real GPU (one CUDA device shared by the rollout, teacher and learner actors through Ray's
fractional GPUs; serving buffer and teacher hidden states through CUDA IPC handles), with the hf engine and the
toy pair of the default preset (tiny_cpu: fp32 weights, model.dtype=float32). The same mode's plumbing on CPU
(run.device=cpu) is tests/test_modes.py."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from gpu_deps import needs

from opd.metrics import read_jsonl

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs 1 CUDA GPU")
needs("ray", required=False, why="the modes run under Ray (a bare GPU box may lack it): pip install -e .")

# One step's full-vocabulary divergences and the update they drive; compared between devices.
COMPARED = ("loss", "kl/forward/mean", "kl/reverse/mean", "entropy/student/mean", "grad/norm")


def _run(root, out_dir, name: str, *overrides: str) -> tuple[list[dict], list[dict]]:
    """driver.py for two steps (evaluations at the start and the end): its step and evaluation records."""
    args = ["--set", "train.steps=2", "--set", "train.eval_every=0", "--set", "train.prompts_per_step=16",
            "--set", "data.num_eval_prompts=32", "--set", f"run.out_dir={out_dir}", "--set", f"run.name={name}",
            "--set", "run.progress=false", *overrides]
    out = subprocess.run([sys.executable, "driver.py", *args], cwd=root, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return read_jsonl(out_dir / name / "metrics.jsonl"), read_jsonl(out_dir / name / "eval.jsonl")


def test_colocated_on_cuda_trains_on_policy(root, tmp_path):
    """The mode as a user runs it (sampler auto: FlashInfer when installed): each step trains the policy the
    engine sampled from, the engine saw every update through the mapped serving buffer (the driver itself
    checks the engine's version after each sync), and the learner's log-probs of the sampled tokens equal the
    engine's. Both sides compute in fp32 on one GPU, differing only in summation order (KV-cached decode vs one
    forward over the whole sequence): ~1e-5; an engine one update behind differs by more than 1e-3
    (tests/test_modes.py::test_split_overlap_samples_one_step_behind)."""
    steps, evals = _run(root, tmp_path, "colo", "--mode", "colocated")
    assert [r["step"] for r in steps] == [1, 2] and [r["step"] for r in evals] == [0, 2]
    assert [r["policy/version"] for r in steps] == [1.0, 2.0]
    assert all(r["sync/policy_lag"] == 0 and r["step/skipped"] == 0 for r in steps)
    assert all(r["response/tokens/sum"] >= 16 for r in steps)  # every prompt answered
    for r in steps:
        gap = r["logprob/learner_minus_rollout/absmax"]
        assert gap < 1e-4, f"step {r['step']}: learner and engine log-probs differ by {gap:.2e}"
        assert all(math.isfinite(r[key]) for key in COMPARED), r


def test_colocated_on_cuda_reproduces_the_cpu_run(root, tmp_path):
    """Same seed, same fp32 weights, cpu mode on the CPU vs colocated mode on the GPU: every step's loss, KLs,
    entropy and gradient norm agree to rel 1e-3, and each evaluation's KL too.

    The two devices' random streams differ (torch's CPU and CUDA generators, transformers' generate vs the
    engine's decode loop), so both runs sample with top_k=1: each token is the argmax, the responses are the
    same on both devices (a near-tie within fp32 noise would break this; the toy models have none at these
    prompts), and what is compared is the loss, the transports and the update, not the sampler. fp32 matmuls
    (torch's default: no TF32) make step 1 agree to ~1e-6; step 2 adds one Adam step from gradients that agree
    to ~1e-6. The learner-vs-engine canary is off with top-k (not comparable), hence the other test.
    """
    want_steps, want_evals = _run(root, tmp_path, "cpu", "--mode", "cpu", "--set", "rollout.top_k=1")
    # torch's sampling on the GPU (FlashInfer's has its own tests): the argmax of a one-hot distribution
    steps, evals = _run(root, tmp_path, "colo", "--mode", "colocated", "--set", "rollout.top_k=1",
                        "--set", "rollout.sampler=torch")
    assert [r["policy/version"] for r in steps] == [1.0, 2.0]
    for got, want in zip(steps, want_steps, strict=True):
        assert got["response/tokens/sum"] == want["response/tokens/sum"], (got["step"], "different responses")
        for key in COMPARED:
            assert got[key] == pytest.approx(want[key], rel=1e-3, abs=1e-6), (got["step"], key, got[key], want[key])
    for got, want in zip(evals, want_evals, strict=True):
        assert got["eval/accuracy/student"] == want["eval/accuracy/student"], got["step"]
        assert got["eval/kl/reverse/mean"] == pytest.approx(want["eval/kl/reverse/mean"], rel=1e-3, abs=1e-6)
