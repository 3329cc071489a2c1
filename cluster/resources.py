"""What each mode needs from the machine; checked before Ray starts (this module does not import Ray)."""

from __future__ import annotations

from dataclasses import dataclass

from opd.config import Config, ConfigError

GPUS_NEEDED = {"cpu": 0, "colocated": 1, "split": 2}


def uses_gpus(cfg: Config) -> bool:
    return GPUS_NEEDED[cfg.run.mode] > 0 and cfg.run.device == "auto"


def check_devices(cfg: Config) -> None:
    """Refuse a mode this machine cannot run, before Ray starts."""
    needed = GPUS_NEEDED[cfg.run.mode]
    if cfg.run.mode == "split" and cfg.run.device == "cpu":
        raise ConfigError("run.mode=split has no CPU plumbing run yet: use --mode cpu or --mode colocated")
    if not uses_gpus(cfg):
        return
    import torch

    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if have < needed:
        raise ConfigError(f"run.mode={cfg.run.mode} needs {needed} GPU(s), this machine has {have}: "
                          f"use --mode cpu")
    raise ConfigError(f"run.mode={cfg.run.mode} is not available on GPUs in this version yet: use --mode cpu "
                      f"(--set run.device=cpu runs the colocated weight plumbing on the CPU)")


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
    actors: dict[str, ActorPlace]  # "rollout", "teacher", "learner"


# colocated: all three on one GPU through fractional shares (they must add up to at most 1); the rollout engine
# gets the largest share because its KV cache is the biggest consumer while it generates.
COLOCATED_GPU_SHARES = {"rollout": 0.4, "teacher": 0.3, "learner": 0.3}


def placement_plan(mode: str, cpus_per_actor: float, use_gpus: bool = True) -> PlacementPlan:
    """cpu: three CPU bundles packed on one node (the shared-memory weights need learner and engine on one
    machine). colocated: one bundle with one GPU shared by fractional num_gpus, so every actor sees the same
    device (CUDA IPC needs that). split: the learner alone on GPU 0; rollout and teacher share GPU 1."""
    c = cpus_per_actor
    if mode == "cpu" or (mode == "colocated" and not use_gpus):
        return PlacementPlan(bundles=({"CPU": c},) * 3, strategy="STRICT_PACK",
                             actors={role: ActorPlace(i, c, 0.0)
                                     for i, role in enumerate(("rollout", "teacher", "learner"))})
    if mode == "colocated":
        return PlacementPlan(bundles=({"CPU": 3 * c, "GPU": 1},), strategy="STRICT_PACK",
                             actors={role: ActorPlace(0, c, share) for role, share in COLOCATED_GPU_SHARES.items()})
    if mode == "split":
        return PlacementPlan(bundles=({"CPU": c, "GPU": 1}, {"CPU": 2 * c, "GPU": 1}), strategy="PACK",
                             actors={"learner": ActorPlace(0, c, 1.0), "rollout": ActorPlace(1, c, 0.5),
                                     "teacher": ActorPlace(1, c, 0.5)})
    raise ConfigError(f"run.mode={mode!r} is unknown: use cpu, colocated or split")
