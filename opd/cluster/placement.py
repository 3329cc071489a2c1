"""Where each actor goes: the run's placement group, its bundles and each replica's share of them, per mode.
Computed before Ray starts (this module does not import Ray); opd/cluster/topology.py makes the group."""

from __future__ import annotations

from dataclasses import dataclass

from opd.config import MODES, ConfigError


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
                   teacher_replicas: int = 1, learner_replicas: int = 1, gpus: int = 1) -> PlacementPlan:
    """cpu (and any mode's plumbing run on CPU): one CPU bundle per actor, packed on one node (the shared-memory
    transports need one machine). colocated: one bundle per GPU, its actors sharing it through fractional
    num_gpus, so they see the same device (CUDA IPC needs that); with run.gpus=N, N such bundles, replica i of
    each role on GPU i, packed onto as few nodes as hold them (several nodes when one does not: the learner
    shards talk over NCCL, nothing else crosses GPUs). split: the learner alone on the first GPU; rollout replica
    i and teacher replica i share GPU 1 + i (the two-GPU benchmark layout with one of each)."""
    c = cpus_per_actor
    counts = {"rollout": rollout_replicas, "teacher": teacher_replicas, "learner": learner_replicas}
    if mode not in MODES:
        raise ConfigError(f"run.mode={mode!r} is unknown: use cpu, colocated or split")
    if mode == "cpu" or not use_gpus:
        places, bundles = {}, []
        for role, n in counts.items():
            places[role] = tuple(ActorPlace(len(bundles) + i, c, 0.0) for i in range(n))
            bundles += [{"CPU": c}] * n
        return PlacementPlan(bundles=tuple(bundles), strategy="STRICT_PACK", actors=places)
    if mode == "colocated" and gpus > 1:  # config.py made every replica count equal to gpus
        return PlacementPlan(bundles=({"CPU": c * len(counts), "GPU": 1},) * gpus, strategy="PACK",
                             actors={role: tuple(ActorPlace(i, c, COLOCATED_GPU_SHARES[role]) for i in range(gpus))
                                     for role in counts})
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
