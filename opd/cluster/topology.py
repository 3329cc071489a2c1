"""Modes -> Ray: how the driver connects, and where the rollout, teacher and learner actors are placed."""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from opd.actors.learner import LearnerActor
from opd.actors.rollout import RolloutActor
from opd.actors.teacher import TeacherActor
from opd.cluster.placement import placement_plan
from opd.batch import RolloutBatch
from opd.config import PROJECT_ROOT, Config, ConfigError
from opd.metrics import Interrupted, RunStopped
from opd.modes import hidden_transport, uses_gpus
from opd.transport.groups import GroupSpec, free_endpoint
from opd.transport.hidden_states import HIDDEN_GROUP
from opd.transport.weights import WEIGHTS_GROUP

OWNER_ENV = "OPD_RAY_OWNER"  # a private Ray instance's processes carry their driver's pid
PLACEMENT_TIMEOUT_S = 120
RECOVER_TIMEOUT_S = 300  # a restarted actor reloads its model


def connect(cfg: Config) -> bool:
    """Join the cluster named by run.ray_address or RAY_ADDRESS (set by `ray job submit`), else start a
    private local instance; a Ray this process already joined (opd.study: one instance for all its runs) is
    kept. Returns whether this call started Ray (and so must shut it down)."""
    if ray.is_initialized():
        return False
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
    _reclaim_orphans()
    os.environ[OWNER_ENV] = str(os.getpid())  # inherited by every process of the instance: see _reclaim_orphans
    _loopback_only()
    ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING,
             runtime_env={"env_vars": {"PYTHONPATH": str(PROJECT_ROOT)}})
    return True


def _reclaim_orphans() -> None:
    """A driver killed with SIGKILL leaves Ray processes of its private instance behind (its dashboard and
    runtime-env agents stay, waiting on the dead GCS). They carry OWNER_ENV with the dead driver's pid: stop them.
    Only processes of this user whose owner is gone; a live run's, and anything not started by a driver, stay."""
    import signal

    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if proc.stat().st_uid != os.getuid():
                continue
            owner = next((v for v in (proc / "environ").read_bytes().split(b"\0")
                          if v.startswith(OWNER_ENV.encode() + b"=")), None)
            if owner is None or int(owner.partition(b"=")[2]) == os.getpid():
                continue
            try:
                os.kill(int(owner.partition(b"=")[2]), 0)
            except ProcessLookupError:  # the owner is dead: this is a leftover of its private instance
                os.kill(int(proc.name), signal.SIGKILL)
                print(f"note: stopped pid {proc.name}, left running by a run that was killed", file=sys.stderr)
        except (OSError, ValueError):  # gone meanwhile, or not readable
            continue


def _loopback_only() -> None:
    """Ray binds its servers to the node's IP, several on every interface; a private instance serves this machine
    alone, so make the node's IP the loopback: Ray's single-machine setting (its default on macOS and Windows),
    read by this process (cached at import) and by Ray's own. RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1 opts out."""
    from ray._private import ray_constants

    os.environ.setdefault(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR, "0")
    ray_constants.ENABLE_RAY_CLUSTER = ray_constants.env_bool(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR, True)


def _reload_ray_auth_config() -> None:
    """Ray caches its config (auth mode included) when it is first used in a process; make it read the
    environment again, as Ray itself does when it turns token auth on."""
    try:
        from ray._raylet import AuthenticationTokenLoader, Config as RayConfig
    except ImportError:  # a Ray without token auth: nothing cached to refresh
        return
    RayConfig.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


@ray.remote(num_cpus=0)
def _merge_rollouts(offsets: list[int], *parts: RolloutBatch) -> RolloutBatch:
    """The shards several rollout replicas sampled, as one batch indexed by the step's prompts."""
    for offset, part in zip(offsets, parts, strict=True):
        part.prompt_index = part.prompt_index + offset
    return RolloutBatch.concat(list(parts))


_endpoint = ray.remote(num_cpus=0)(free_endpoint)  # run in learner rank 0's bundle: the learners' rendezvous


def collect(refs: list[ray.ObjectRef], timeout: float | None = None):
    """Rank 0's result of a call every learner replica makes at once, after all of them returned; the first error
    any raised, as soon as it is raised (a replica that failed leaves the others waiting in a collective, so
    waiting on rank 0 first would hang). GetTimeoutError after `timeout` seconds."""
    pending, deadline = list(refs), None if timeout is None else time.monotonic() + timeout
    while pending:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready, pending = ray.wait(pending, num_returns=1, timeout=left)
        if not ready:
            raise ray.exceptions.GetTimeoutError(f"{len(pending)} learner replica(s) did not answer in {timeout} s")
        ray.get(ready)
    return ray.get(refs[0])


@dataclass
class Actors:
    """The run's actors and the phases of a step over them. The driver calls these and never sees how many
    replicas there are or how tensors travel between them (opd/cluster/placement.py, opd/transport/)."""

    cfg: Config
    rollouts: list[ray.actor.ActorHandle]
    teachers: list[ray.actor.ActorHandle]
    learners: list[ray.actor.ActorHandle]  # one, or run.learner_replicas sharding the student (rank = index)
    group: PlacementGroup
    launch_s: float = 0.0  # placing and starting the actors (their models loaded), for the benchmark's start-up
    _sends: list = field(default_factory=list)  # split: the teachers' pending hidden-state sends

    @property
    def rollout(self) -> ray.actor.ActorHandle:
        return self.rollouts[0]

    @property
    def teacher(self) -> ray.actor.ActorHandle:
        return self.teachers[0]

    @property
    def learner(self) -> ray.actor.ActorHandle:
        return self.learners[0]

    collect = staticmethod(collect)  # the callers' way to wait on train_step / evaluate

    def _learners(self, method: str, *args, **kwargs) -> list[ray.ObjectRef]:
        """`method` called on every learner replica at once (their collectives pair up); `collect` the result."""
        return [getattr(learner, method).remote(*args, **kwargs) for learner in self.learners]

    def set_teacher_head(self) -> None:
        """The teacher's output head to every learner replica, once (frozen)."""
        collect(self._learners("set_teacher_head", self.teacher.output_head.remote()))

    def save_checkpoint(self, path: str, run_state: dict) -> str:
        return collect(self._learners("save_checkpoint", path, run_state))

    def load_checkpoint(self, path: str) -> int:
        return collect(self._learners("load_checkpoint", path))

    def generate(self, prompts: list[list[int]], *, seed: int, greedy: bool = False,
                 prefixes: list[list[int]] | None = None) -> ray.ObjectRef:
        """One RolloutBatch for `prompts` (continuing `prefixes`, the hybrid's gold prefixes): replica i samples
        the i-th consecutive share (seed + i)."""
        if len(self.rollouts) == 1:
            return self.rollout.generate.remote(prompts, seed=seed, greedy=greedy, prefixes=prefixes)
        n = len(self.rollouts)
        bounds = [round(i * len(prompts) / n) for i in range(n + 1)]
        parts = [r.generate.remote(prompts[lo:hi], seed=seed + i, greedy=greedy,
                                   prefixes=None if prefixes is None else prefixes[lo:hi])
                 for i, (r, lo, hi) in enumerate(zip(self.rollouts, bounds, bounds[1:])) if hi > lo]
        return _merge_rollouts.remote([lo for lo, hi in zip(bounds, bounds[1:]) if hi > lo], *parts)

    def teacher_sample(self, prompts: list[list[int]], teacher_prompts: list[list[int]] | None, *,
                       seed: int) -> ray.ObjectRef:
        """Off-policy samples of `prompts` by the teacher (TeacherActor.sample): replica i answers the i-th
        consecutive share (seed + i), as `generate` shares prompts among the rollout replicas."""
        n = len(self.teachers)
        bounds = [round(i * len(prompts) / n) for i in range(n + 1)]
        shares = [(lo, t.sample.remote(prompts[lo:hi], None if teacher_prompts is None else teacher_prompts[lo:hi],
                                       seed=seed + i))
                  for i, (t, lo, hi) in enumerate(zip(self.teachers, bounds, bounds[1:])) if hi > lo]
        return shares[0][1] if len(shares) == 1 else _merge_rollouts.remote([lo for lo, _ in shares],
                                                                            *[ref for _, ref in shares])

    @staticmethod
    def combine(offsets: list[int], parts: list) -> ray.ObjectRef:
        """One batch of a step's parts (RolloutBatch refs or values) whose prompts start at `offsets` in the
        step's prompts: the student's samples and the off-policy ones."""
        return _merge_rollouts.remote(offsets, *parts)

    def score(self, batch: ray.ObjectRef, *, teacher_prompts: list[list[int]] | None = None,
              hidden_states: bool | None = None) -> list[ray.ObjectRefGenerator]:
        """The teacher's scores of `batch`, streamed: one generator per teacher replica, replica i yielding the
        parts of the learner's micro-batches i, i + R, ... (TeacherActor.score) as it finishes each."""
        kwargs = dict(teacher_prompts=teacher_prompts, hidden_states=hidden_states, replicas=len(self.teachers))
        return [t.score.remote(batch, replica=i, **kwargs) for i, t in enumerate(self.teachers)]

    @staticmethod
    def wait_scored(scores: list[ray.ObjectRefGenerator]) -> None:
        """Until every teacher replica has scored its share (timing; nothing is fetched here)."""
        ray.wait([g.completed() for g in scores], num_returns=len(scores), fetch_local=False)

    @staticmethod
    def _parts(scores: list[ray.ObjectRefGenerator]) -> list[ray.ObjectRef]:
        """The refs of every micro-batch's part in plan order (part k from replica k % R). Passed to the learner
        inside a list, so Ray does not resolve them: the learner pulls one micro-batch's states at a time."""
        per_replica = [list(g) for g in scores]
        return [per_replica[k % len(scores)][k // len(scores)] for k in range(sum(map(len, per_replica)))]

    def train_step(self, batch: ray.ObjectRef, scores: list[ray.ObjectRefGenerator]) -> list[ray.ObjectRef]:
        """Every learner replica's step on the batch (each its share of the micro-batches): `collect` the metrics."""
        refs = self._learners("train_step", batch, self._parts(scores))
        self._send_hidden()
        return refs

    def evaluate(self, batch: ray.ObjectRef, scores: list[ray.ObjectRefGenerator]) -> list[ray.ObjectRef]:
        refs = self._learners("evaluate", batch, self._parts(scores))
        self._send_hidden()
        return refs

    def _send_hidden(self) -> None:
        # split: each teacher sends what it scored while the learner receives it (checked at the next sync)
        if hidden_transport(self.cfg) == "collective":
            self._sends += [t.send_pending.remote() for t in self.teachers]

    def _load(self, replicas: list[int], updates: list[ray.ObjectRef]) -> list[ray.ObjectRef]:
        """Rollout replica i loads learner replica i % N's update (colocated, run.gpus=N: the one on its GPU)."""
        return [self.rollouts[i].load_weights.remote(updates[i % len(updates)]) for i in replicas]

    def sync(self) -> int:
        """The learner's current weights to every rollout replica; returns the version they all hold."""
        updates = self._learners("export_weights")  # sharded: each replica gathers the whole weights
        loads = self._load(list(range(len(self.rollouts))), updates)
        broadcast = [self.learner.broadcast_weights.remote()] if self.cfg.run.mode == "split" else []
        collect(updates + loads + broadcast)
        versions = ray.get(loads + broadcast)
        ray.get(self._sends)
        self._sends = []
        if len(set(versions)) != 1:
            raise RuntimeError(f"after a sync the engines and learner hold weight versions {versions}")
        return versions[0]

    def recover(self, step: int, error: Exception, run_dir) -> None:
        """After an actor died mid-step: wait for Ray to restart the rollout and teacher actors that died, give
        each restarted engine the learner's current weights, and return so the step can be retried. A dead
        learner (its optimizer state is gone) or a split-mode group member stops the run."""
        self._sends = []
        resume = f"continue from the last checkpoint with: python driver.py --resume {run_dir}"
        try:  # a lost learner replica takes its shards of the weights and optimizer state with it
            collect(self._learners("weight_version"), timeout=RECOVER_TIMEOUT_S)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            raise RunStopped(f"step {step}: a learner actor died ({type(error).__name__}); {resume}") from None
        if self.cfg.run.mode == "split" or not self.cfg.run.max_actor_restarts:
            why = ("split mode does not re-form its collective groups" if self.cfg.run.mode == "split"
                   else "run.max_actor_restarts=0")
            raise RunStopped(f"step {step}: an actor died ({type(error).__name__}) and {why}; {resume}") from None
        try:  # an actor out of restarts raises here
            versions = _when_back([r.weight_version for r in self.rollouts])
            _when_back([t.alive for t in self.teachers])
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as e:
            raise RunStopped(f"step {step}: a rollout or teacher actor did not come back ({type(e).__name__}, "
                             f"run.max_actor_restarts={self.cfg.run.max_actor_restarts}); {resume}") from None
        stale = [i for i, v in enumerate(versions) if v < 0]  # restarted: no weights yet
        if stale:
            updates = self._learners("export_weights", full=True)
            collect(updates + self._load(stale, updates))

    def shutdown(self, wait_s: float = 60.0) -> None:
        """Release the learner's shared buffer, then stop the actors this run started (by handle)."""
        try:
            ray.get(self._learners("shutdown"), timeout=wait_s)
        except (ray.exceptions.RayError, TimeoutError) as e:  # a dead learner: its file may stay in /dev/shm
            logging.getLogger(__name__).warning("learner shutdown failed (%s)", type(e).__name__)
        for handle in (*self.rollouts, *self.teachers, *self.learners):
            ray.kill(handle)
        remove_placement_group(self.group)


def _when_back(methods: list) -> list:
    """Call each actor method until its actor answers: a restarting actor raises ActorUnavailableError."""
    deadline = time.monotonic() + RECOVER_TIMEOUT_S
    while True:
        try:
            return ray.get([m.remote() for m in methods], timeout=RECOVER_TIMEOUT_S)
        except ray.exceptions.ActorUnavailableError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


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
    if r.mode == "colocated":
        # The engines start, and sglang reserves its KV cache, before the teacher and learner load on the same GPU:
        # sglang sizes the cache from the memory free when it starts, so a model loading meanwhile would shrink it.
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
