"""The loop with `rollout.engine=sglang` on the CPU, under Ray: the colocated mode as a GPU runs it (the rollout
actor starts sglang's real engine in its process; the learner's weights reach it as flattened buckets through
`update_weights_from_tensor`, between begin/end_weight_update; the KV cache is released after each generate and
resumed before the next) except what needs CUDA: CPU tensors as shared-memory file names instead of CUDA IPC
handles, and releases that are ordered and waited for but not sent (SGLangEngine.releases_memory)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from opd.metrics import read_jsonl
from opd.toy import greedy_accuracy
from tests.sglang_harness import cpu_env, require_engine

from test_learning import ACCURACY_GAIN, KL_FALL

SGLANG_ON_CPU = ["--mode", "colocated", "--set", "run.device=cpu", "--set", "rollout.engine=sglang"]


def _run(root, tmp_path, *overrides, name="run"):
    require_engine()
    args = [*SGLANG_ON_CPU, "--set", f"run.out_dir={tmp_path}", "--set", f"run.name={name}",
            "--set", "run.progress=false", *overrides]
    out = subprocess.run([sys.executable, "driver.py", *args], cwd=root, capture_output=True, text=True,
                         timeout=1200, env=cpu_env())
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return tmp_path / name


@pytest.mark.slow
def test_the_loop_with_sglang_learns_and_its_greedy_outputs_are_the_hf_engines(root, tmp_path):
    """test_learning's run (80 steps of 64 prompts, all 500 held-out prompts) with sglang as the rollout engine:
    the held-out KL falls as the hf engine's run must; the sampled log-probs equal the learner's recomputation at
    every step (so each sync reached the engine); and greedy decoding by sglang, at the first and the last
    weights, scores what transformers' greedy decoding scores at the same weights (500 prompts)."""
    run_dir = _run(root, tmp_path, "--set", "train.steps=80", "--set", "train.eval_every=0",
                   "--set", "train.prompts_per_step=64", "--set", "data.num_eval_prompts=500",
                   "--set", "train.seed=0", name="learn")
    before, after = read_jsonl(run_dir / "eval.jsonl")
    kl0, kl1 = before["eval/kl/reverse/mean"], after["eval/kl/reverse/mean"]
    assert kl1 <= kl0 / KL_FALL, f"held-out reverse KL {kl0:.4f} -> {kl1:.4f}: fell by less than {KL_FALL}x"
    acc0, acc1 = before["eval/accuracy/student"], after["eval/accuracy/student"]
    assert acc1 >= acc0 + ACCURACY_GAIN, f"student accuracy {acc0:.1%} -> {acc1:.1%}"
    steps = read_jsonl(run_dir / "metrics.jsonl")
    assert max(r["logprob/learner_minus_rollout/absmax"] for r in steps) < 1e-4
    assert all(r["step/skipped"] == 0 for r in steps)
    tokenizer = AutoTokenizer.from_pretrained(root / "assets/toy/student")
    for folder, got in ((root / "assets/toy/student", acc0), (run_dir / "checkpoints/step_80", acc1)):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        assert greedy_accuracy(model, tokenizer, "eval", limit=500) == pytest.approx(got, abs=1e-9), folder


def test_sglang_on_the_cpu_needs_the_stand_in(root, tmp_path):
    """Without an importable sgl_kernel: one line naming the stand-in, before Ray starts."""
    require_engine()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "driver.py", *SGLANG_ON_CPU, "--set", f"run.out_dir={tmp_path}"],
                         cwd=root, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 2 and "sgl_kernel" in out.stderr and "tests/sglang_cpu" in out.stderr, out.stderr
    assert not list(tmp_path.iterdir()), "nothing is written before the error"
