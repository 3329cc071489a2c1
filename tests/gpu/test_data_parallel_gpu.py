"""The data-parallel learner on two GPUs: two learner replicas (FSDP2 over NCCL, one process and one GPU each, as
Ray places them in colocated mode with run.gpus=2) take one step on a batch of an odd number of micro-batches,
and give one learner's loss and weights (the single learner's step computed on the CPU in fp32; the GPUs also
fp32: the same math in another summation order), each holding half the optimizer state. The same code over gloo on
CPU is tests/test_data_parallel.py."""

from __future__ import annotations

import pytest
import torch
from dp_pair import run_pair, sample, step
from gpu_deps import cuda, nccl

from opd.actors.learner import LearnerActor
from opd.overrides import override
from opd.presets import tiny_cpu

cuda(2)
nccl()


def test_two_gpus_take_one_learners_step(tmp_path):
    cfg = override(override(tiny_cpu(), "learner.micro_batch_tokens=12"), "loss.kind=jsd")
    batch_file = sample(cfg, tmp_path / "batch.pt")  # sampled and scored on the CPU (cpu mode)
    saved = torch.load(batch_file, weights_only=False)
    assert len(saved["batch"].micro_batches(12)) % 2 == 1  # replica 1 runs an empty pass
    single = LearnerActor(cfg)
    try:
        want, want_weights = step(single, saved)
    finally:
        single.shutdown()
    gpus = override(override(override(cfg, "run.mode=colocated"), "run.gpus=2"), "run.cpus_per_actor=0.25")
    replicas = run_pair(gpus, batch_file, tmp_path, gpu=True)
    for r in replicas:
        for key in ("loss", "kl/forward/mean", "kl/reverse/mean", "grad/norm"):
            assert r["metrics"][key] == pytest.approx(want[key], rel=1e-4, abs=1e-5), key
        assert torch.allclose(r["weights"], want_weights, atol=1e-4, rtol=0)
    held = [r["optimizer_bytes"] for r in replicas]
    assert max(held) <= 0.51 * sum(held)
