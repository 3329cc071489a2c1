"""Modes -> Ray: how the driver connects, and where the rollout, teacher and learner actors are placed."""

from __future__ import annotations

import logging
import os
import secrets
from dataclasses import dataclass

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.learner import LearnerActor
from actors.rollout import RolloutActor
from actors.teacher import TeacherActor
from cluster.resources import placement_plan, uses_gpus
from opd.config import PROJECT_ROOT, Config

def connect(cfg: Config) -> bool:
    """Join the cluster named by run.ray_address or RAY_ADDRESS (set by `ray job submit`), else start a
    private local instance. Returns whether this process started Ray (and so must shut it down)."""
    address = cfg.run.ray_address or os.environ.get("RAY_ADDRESS", "")
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
        return False
    # Ray >= 2.5x enables token auth for a local ray.init() and saves the token in ~/.ray/auth_token; a later
    # `ray start` then turns auth on and `ray job submit` fails with "Missing authentication token". Keep the
    # auth, but hand this private instance its token through the environment (inherited by Ray's own
    # processes) so nothing is written to disk. The token is never logged.
    if os.environ.get("RAY_AUTH_MODE", "token") == "token" and not os.environ.get("RAY_AUTH_TOKEN"):
        os.environ["RAY_AUTH_MODE"] = "token"
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
        _reload_ray_auth_config()
    ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING,
             runtime_env={"env_vars": {"PYTHONPATH": str(PROJECT_ROOT)}})
    return True


def _reload_ray_auth_config() -> None:
    """Ray caches its config (auth mode included) when it is first used in a process; make it read the
    environment again, as Ray itself does when it turns token auth on."""
    try:
        from ray._raylet import AuthenticationTokenLoader, Config as RayConfig
    except ImportError:  # a Ray without token auth: nothing cached to refresh
        return
    RayConfig.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


@dataclass
class Actors:
    rollout: ray.actor.ActorHandle
    teacher: ray.actor.ActorHandle
    learner: ray.actor.ActorHandle
    group: PlacementGroup

    def shutdown(self) -> None:
        """Release the learner's shared buffer, then stop the actors this run started (by handle)."""
        try:
            ray.get(self.learner.shutdown.remote(), timeout=60)
        except (ray.exceptions.RayError, TimeoutError) as e:  # a dead learner: its file may stay in /dev/shm
            logging.getLogger(__name__).warning("learner shutdown failed (%s)", type(e).__name__)
        for handle in (self.rollout, self.teacher, self.learner):
            ray.kill(handle)
        remove_placement_group(self.group)


def launch(cfg: Config) -> Actors:
    """One placement group per run, laid out by cluster/resources.py's plan for the mode."""
    plan = placement_plan(cfg.run.mode, cfg.run.cpus_per_actor, use_gpus=uses_gpus(cfg))
    group = placement_group(list(plan.bundles), strategy=plan.strategy)
    ray.get(group.ready(), timeout=120)

    def place(cls, role: str):
        where = plan.actors[role]
        strategy = PlacementGroupSchedulingStrategy(placement_group=group, placement_group_bundle_index=where.bundle)
        return ray.remote(cls).options(num_cpus=where.num_cpus, num_gpus=where.num_gpus,
                                       scheduling_strategy=strategy).remote(cfg)

    return Actors(rollout=place(RolloutActor, "rollout"), teacher=place(TeacherActor, "teacher"),
                  learner=place(LearnerActor, "learner"), group=group)
