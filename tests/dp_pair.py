"""Two learner replicas in two processes, without Ray: one data-parallel step (FSDP2) on a batch, against one
learner's step on the same batch. The CPU test runs it over gloo (tests/test_data_parallel.py), the GPU test over
NCCL on two GPUs (tests/gpu/test_data_parallel_gpu.py): the same code, the learner's own."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.multiprocessing as mp

from opd.actors.learner import LearnerActor
from opd.actors.rollout import RolloutActor
from opd.actors.teacher import TeacherActor
from opd import data_parallel
from opd.config import Config


def sample(cfg: Config, path: Path) -> Path:
    """A batch sampled by the student in cpu mode, the teacher's parts of it and its output head, in a file."""
    learner, teacher, rollout = LearnerActor(cfg), TeacherActor(cfg), RolloutActor(cfg)
    try:
        rollout.load_weights(learner.export_weights())
        prompts = [[3, 4, 14, 5, 6, 15], [13, 12, 14, 4, 4, 15], [7, 8, 14, 9, 3, 15], [5, 5, 14, 6, 6, 15]]
        batch = rollout.generate((prompts * 2)[:7], seed=0)  # 7 samples
        torch.save({"batch": batch, "parts": list(teacher.score(batch)), "head": teacher.output_head()}, path)
    finally:
        learner.shutdown()
    return path


def step(learner: LearnerActor, saved: dict) -> tuple[dict, torch.Tensor]:
    """One train step on the saved batch; its metrics and the whole weights after it (flat, fp32, on the CPU)."""
    learner.set_teacher_head(saved["head"])
    metrics = learner.train_step(saved["batch"], saved["parts"])
    learner.export_weights()  # sharded: every replica gathers the whole weights into its serving buffer
    flat = learner.serving.flat if learner.serving is not None else torch.cat(
        [p.detach().flatten() for p in learner.model.parameters()])
    return metrics, flat.float().cpu()


def _replica(rank: int, cfg: Config, port: int, batch_file: str, out: str, gpu: bool) -> None:
    if gpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(rank)  # as Ray gives each actor its GPU: cuda:0 in the process
    learner = LearnerActor(cfg, rank, f"tcp://127.0.0.1:{port}")
    try:
        metrics, flat = step(learner, torch.load(batch_file, weights_only=False))
        torch.save({"metrics": metrics, "weights": flat,
                    "optimizer_bytes": data_parallel.optimizer_state_bytes(learner.optimizer)},
                   Path(out) / f"rank{rank}.pt")
    finally:
        learner.shutdown()
        torch.distributed.destroy_process_group()


def run_pair(cfg: Config, batch_file: Path, out: Path, *, gpu: bool = False) -> list[dict]:
    """Each replica's metrics, whole weights after the step and optimizer-state bytes (cfg: 2 learner replicas)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.start_processes(_replica, args=(cfg, port, str(batch_file), str(out), gpu), nprocs=2, join=True,
                       start_method="spawn")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]
