"""Modes -> Ray placement: the run's actors launched where opd/cluster/placement.py's plan puts them (one placement
group), the collective groups of split mode joined, and everything stopped however the run ends."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from opd.actors.learner import LearnerActor
from opd.actors.rollout import RolloutActor
from opd.actors.teacher import TeacherActor
from opd.cluster.actors import Actors
from opd.cluster.placement import placement_plan
from opd.cluster.ray_instance import connect
from opd.config import Config, ConfigError
from opd.metrics import Interrupted
from opd.modes import uses_gpus
from opd.transport.groups import GroupSpec, free_endpoint
from opd.transport.hidden_states import HIDDEN_GROUP
from opd.transport.weights import WEIGHTS_GROUP

PLACEMENT_TIMEOUT_S = 120

_endpoint = ray.remote(num_cpus=0)(free_endpoint)  # run in learner rank 0's bundle: the learners' rendezvous


@contextlib.contextmanager
def running(cfg: Config) -> Iterator[Actors]:
    """The run's actors, launched on the cluster `connect` joins (or a private Ray); on the way out, however the
    run ends, the actors are stopped and a Ray this process started is shut down."""
    started_ray, actors, wait_s = connect(cfg), None, 60.0
    try:
        actors = launch(cfg)
        yield actors
    except Interrupted:  # at once (a second signal): the learner may be mid-step, do not wait for it long
        wait_s = 5.0
        raise
    finally:
        if actors is not None:
            actors.shutdown(wait_s)
        if started_ray:
            ray.shutdown()


def launch(cfg: Config) -> Actors:
    """One placement group per run, laid out by opd/cluster/placement.py's plan for the mode; in split mode the
    collective groups (learner -> engines for weights, teachers -> learner for hidden states) are joined here."""
    r, t0 = cfg.run, time.perf_counter()
    plan = placement_plan(r.mode, r.cpus_per_actor, use_gpus=uses_gpus(cfg), rollout_replicas=r.rollout_replicas,
                          teacher_replicas=r.teacher_replicas, learner_replicas=r.learner_replicas, gpus=r.gpus)
    group = placement_group(list(plan.bundles), strategy=plan.strategy)
    try:
        ray.get(group.ready(), timeout=PLACEMENT_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(group)
        raise ConfigError(f"the Ray cluster cannot place run.mode={r.mode} within {PLACEMENT_TIMEOUT_S} s: it "
                          f"needs {list(plan.bundles)} ({plan.strategy}); free or add resources, or lower "
                          f"run.cpus_per_actor / the replica counts") from None

    def bundle(role: str, i: int) -> PlacementGroupSchedulingStrategy:
        return PlacementGroupSchedulingStrategy(placement_group=group,
                                                placement_group_bundle_index=plan.actors[role][i].bundle)

    def place(cls, role: str, i: int = 0, *args):
        where, strategy = plan.actors[role][i], bundle(role, i)
        # rollout and teacher hold no state a restart loses (the weights come back from the learner)
        restarts = r.max_actor_restarts if role != "learner" and r.mode != "split" else 0
        return ray.remote(cls).options(num_cpus=where.num_cpus, num_gpus=where.num_gpus, max_restarts=restarts,
                                       scheduling_strategy=strategy).remote(cfg, *args)

    rollouts = [place(RolloutActor, "rollout", i, i) for i in range(r.rollout_replicas)]
    if engines_first(cfg):
        # The engines start, and sglang reserves its KV cache, before the teacher and learner load on the same GPU:
        # sglang sizes the cache from the memory free when it starts, so a model loading meanwhile would shrink it
        # (below ~0.23 of the GPU it refuses to start).
        ray.get([e.weight_version.remote() for e in rollouts])
    init_method = ""
    if r.learner_replicas > 1:  # the learners' rendezvous: a free port on rank 0's node (no torchrun)
        address, port = ray.get(_endpoint.options(scheduling_strategy=bundle("learner", 0)).remote())
        init_method = f"tcp://{address if uses_gpus(cfg) else '127.0.0.1'}:{port}"  # CPU: one node, loopback
    actors = Actors(cfg, rollouts=rollouts, teachers=[place(TeacherActor, "teacher", i, i) for i in range(r.teacher_replicas)],
                    learners=[place(LearnerActor, "learner", i, i, init_method) for i in range(r.learner_replicas)],
                    group=group)
    if r.mode == "split":
        _join_groups(cfg, actors)
    actors.launch_s = time.perf_counter() - t0
    return actors


def engines_first(cfg: Config) -> bool:
    """Whether the engines start before the other actors are created: where an engine shares its GPU with a
    teacher (colocated: with the learner too), or sglang sizes its KV cache from what is free at its start."""
    return cfg.run.mode == "colocated" or cfg.rollout.engine == "sglang"


def _join_groups(cfg: Config, actors: Actors) -> None:
    """Members by global index: the learner 0, rollout replica i 1 + i, teacher replica j 1 + r + j."""
    r, t = len(actors.rollouts), len(actors.teachers)
    members = [actors.learner, *actors.rollouts, *actors.teachers]
    specs = {HIDDEN_GROUP: (0, *range(1 + r, 1 + r + t))}
    joins = []
    if cfg.rollout.engine == "sglang":  # sglang opens its own torch.distributed group; the learner joins it
        address, port = ray.get(actors.learner.endpoint.remote())
        joins.append(actors.learner.join_sglang_group.remote(address, port, 1 + r, WEIGHTS_GROUP))
        joins += [e.join_sglang_group.remote(address, port, 1 + r, WEIGHTS_GROUP) for e in actors.rollouts]
    else:
        specs[WEIGHTS_GROUP] = tuple(range(1 + r))
    backend = "nccl" if uses_gpus(cfg) else "gloo"
    address, port = ray.get(actors.learner.endpoint.remote())
    if backend == "gloo":  # the plumbing on CPU: one node (STRICT_PACK), so the rendezvous stays on loopback
        address = "127.0.0.1"
    spec = GroupSpec(specs, world_size=len(members), backend=backend, init_method=f"tcp://{address}:{port}")
    joins += [m.join_groups.remote(spec, i) for i, m in enumerate(members)]
    ray.get(joins)
