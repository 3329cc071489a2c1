"""What each mode is: whether it runs on GPUs, how many it needs, how the teacher's states travel; and the check
that this machine can run it. Plain facts of the config, read by the actors, the memory plan and preflight (the
placement of actors on a Ray cluster is cluster/placement.py's)."""

from __future__ import annotations

import os

from opd.config import Config, ConfigError


def uses_gpus(cfg: Config) -> bool:
    """A GPU mode on its GPUs (run.device=cpu runs a GPU mode's plumbing on the CPU)."""
    return cfg.run.mode != "cpu" and cfg.run.device == "auto"


def gpus_needed(cfg: Config) -> int:
    """colocated: one GPU for everything; split: the learner's GPU plus one per rollout/teacher pair."""
    r = cfg.run
    return {"cpu": 0, "colocated": 1, "split": 1 + max(r.rollout_replicas, r.teacher_replicas)}[r.mode]


def hidden_transport(cfg: Config) -> str:
    """How the teacher's hidden states reach the learner: Ray's object store (cpu), a CUDA IPC handle (same GPU;
    a shared-memory file with run.device=cpu), a collective send/recv (NCCL across GPUs; gloo on CPU)."""
    return {"cpu": "object_store", "colocated": "ipc", "split": "collective"}[cfg.run.mode]


def check_devices(cfg: Config) -> None:
    """Refuse a mode this machine cannot run, before Ray starts."""
    if cfg.rollout.engine == "sglang":
        if not uses_gpus(cfg):
            raise ConfigError(f"rollout.engine=sglang needs a GPU mode (--mode colocated or split), not "
                              f"run.mode={cfg.run.mode} with run.device={cfg.run.device}: use rollout.engine=hf")
        import importlib.util

        if importlib.util.find_spec("sglang") is None:
            raise ConfigError("rollout.engine=sglang but sglang is not installed: pip install -e '.[gpu]' "
                              "(or use --set rollout.engine=hf)")
    if not uses_gpus(cfg):
        return
    import torch

    needed = gpus_needed(cfg)
    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    # On a Ray cluster the GPUs are the cluster's, not this machine's: placement reports a shortfall there.
    if have < needed and not (cfg.run.ray_address or os.environ.get("RAY_ADDRESS")):
        raise ConfigError(f"run.mode={cfg.run.mode} needs {needed} GPU(s), this machine has {have}: use --mode cpu "
                          f"(or --set run.device=cpu to run the mode's plumbing on the CPU)")
