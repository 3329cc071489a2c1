"""colocated mode with `rollout.engine=sglang` on a real GPU: sglang's engine in the rollout actor, the learner's
weights through CUDA IPC flattened buckets, the KV cache and CUDA graphs released after each generate and resumed
before the next (the memory saver). The same loop on the CPU is tests/test_sglang_loop.py; ready for the first GPU
(no GPU has run it yet: docs/gpu.md)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from gpu_deps import needs

from opd.metrics import read_jsonl

needs("ray", required=False, why="the modes run under Ray (a bare GPU box may lack it): pip install -e .")
needs("sglang", why="the rollout.engine=sglang GPU engine")


def test_colocated_with_sglang_trains_on_policy_for_two_steps(root, tmp_path):
    """Two steps as a user runs them: every sync reaches the engine (the policy version follows the learner's),
    and the engine's sampled log-probs equal the learner's recomputation (fp32 weights on both sides: summation
    order only)."""
    args = ["--mode", "colocated", "--set", "rollout.engine=sglang", "--set", "train.steps=2",
            "--set", "train.eval_every=0", "--set", "train.prompts_per_step=16", "--set", "data.num_eval_prompts=32",
            "--set", f"run.out_dir={tmp_path}", "--set", "run.name=sglang", "--set", "run.progress=false"]
    out = subprocess.run([sys.executable, "driver.py", *args], cwd=root, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    steps, evals = read_jsonl(tmp_path / "sglang/metrics.jsonl"), read_jsonl(tmp_path / "sglang/eval.jsonl")
    assert [r["step"] for r in steps] == [1, 2] and [r["step"] for r in evals] == [0, 2]
    assert [r["policy/version"] for r in steps] == [1.0, 2.0]
    assert all(r["sync/policy_lag"] == 0 and r["step/skipped"] == 0 for r in steps)
    for r in steps:
        gap = r["logprob/learner_minus_rollout/absmax"]
        assert gap < 1e-3, f"step {r['step']}: learner and sglang log-probs differ by {gap:.2e}"
