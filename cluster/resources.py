"""What each mode needs from the machine; checked before Ray starts (this module does not import Ray)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from opd.config import Config, ConfigError

GPUS_NEEDED = {"cpu": 0, "colocated": 1, "split": 2}  # with one rollout and one teacher replica


def uses_gpus(cfg: Config) -> bool:
    return GPUS_NEEDED[cfg.run.mode] > 0 and cfg.run.device == "auto"


def gpus_needed(cfg: Config) -> int:
    """colocated: one GPU for everything; split: the learner's GPU plus one per rollout/teacher pair."""
    r = cfg.run
    return {"cpu": 0, "colocated": 1, "split": 1 + max(r.rollout_replicas, r.teacher_replicas)}[r.mode]


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


def hidden_transport(cfg: Config) -> str:
    """How the teacher's hidden states reach the learner: Ray's object store (cpu), a CUDA IPC handle (same GPU;
    a shared-memory file with run.device=cpu), a collective send/recv (NCCL across GPUs; gloo on CPU)."""
    return {"cpu": "object_store", "colocated": "ipc", "split": "collective"}[cfg.run.mode]


@dataclass(frozen=True)
class ActorPlace:
    bundle: int  # index into the placement group's bundles
    num_cpus: float
    num_gpus: float


@dataclass(frozen=True)
class PlacementPlan:
    """One placement group for the run: its bundles, strategy, and where each actor goes."""

    bundles: tuple[dict, ...]
    strategy: str
    actors: dict[str, tuple[ActorPlace, ...]]  # "rollout", "teacher", "learner" -> one place per replica


# colocated: all actors on one GPU through fractional shares (they add up to at most 1); the rollout engine
# gets the largest share because its KV cache is the biggest consumer while it generates.
COLOCATED_GPU_SHARES = {"rollout": 0.4, "teacher": 0.3, "learner": 0.3}


def placement_plan(mode: str, cpus_per_actor: float, use_gpus: bool = True, *, rollout_replicas: int = 1,
                   teacher_replicas: int = 1) -> PlacementPlan:
    """cpu (and any mode's plumbing run on CPU): one CPU bundle per actor, packed on one node (the shared-memory
    transports need one machine). colocated: one bundle with one GPU shared through fractional num_gpus, so
    every actor sees the same device (CUDA IPC needs that). split: the learner alone on the first GPU; rollout
    replica i and teacher replica i share GPU 1 + i (the two-GPU benchmark layout with one of each)."""
    c = cpus_per_actor
    counts = {"rollout": rollout_replicas, "teacher": teacher_replicas, "learner": 1}
    if mode not in GPUS_NEEDED:
        raise ConfigError(f"run.mode={mode!r} is unknown: use cpu, colocated or split")
    if mode == "cpu" or not use_gpus:
        places, bundles = {}, []
        for role, n in counts.items():
            places[role] = tuple(ActorPlace(len(bundles) + i, c, 0.0) for i in range(n))
            bundles += [{"CPU": c}] * n
        return PlacementPlan(bundles=tuple(bundles), strategy="STRICT_PACK", actors=places)
    if mode == "colocated":
        return PlacementPlan(bundles=({"CPU": c * sum(counts.values()), "GPU": 1},), strategy="STRICT_PACK",
                             actors={role: (ActorPlace(0, c, COLOCATED_GPU_SHARES[role] / n),) * n
                                     for role, n in counts.items()})
    gpus = max(rollout_replicas, teacher_replicas)
    members = [[i < rollout_replicas, i < teacher_replicas] for i in range(gpus)]  # who shares GPU 1 + i
    bundles = ({"CPU": c, "GPU": 1},) + tuple({"CPU": c * sum(m), "GPU": 1} for m in members)
    return PlacementPlan(bundles=bundles, strategy="PACK", actors={
        "learner": (ActorPlace(0, c, 1.0),),
        "rollout": tuple(ActorPlace(1 + i, c, 1.0 / sum(members[i])) for i in range(rollout_replicas)),
        "teacher": tuple(ActorPlace(1 + i, c, 1.0 / sum(members[i])) for i in range(teacher_replicas)),
    })
