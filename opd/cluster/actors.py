"""The run's actors seen from the driver: the phases of a step over however many replicas there are, and the
recovery of a rollout or teacher actor that died mid-step. How tensors travel between them is opd/transport/'s;
where they run, opd/cluster/topology.py's."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import ray
from ray.util.placement_group import PlacementGroup, remove_placement_group

from opd.batch import RolloutBatch
from opd.config import Config
from opd.metrics import RunStopped
from opd.modes import state_outbox, weight_route

RECOVER_TIMEOUT_S = 300  # a restarted actor reloads its model


@ray.remote(num_cpus=0)
def _merge_rollouts(offsets: list[int], micro_batch_tokens: int, *parts: RolloutBatch) -> RolloutBatch:
    """The shards several replicas sampled (or a step's student and off-policy samples), as one batch indexed by
    the step's prompts, with its micro-batch plan: the whole batch is born here."""
    for offset, part in zip(offsets, parts, strict=True):
        part.prompt_index = part.prompt_index + offset
    return RolloutBatch.concat(list(parts)).planned(micro_batch_tokens)



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

    learner_result = staticmethod(collect)  # the callers' way to wait on learner_step / learner_evaluate

    def _learners(self, method: str, *args, **kwargs) -> list[ray.ObjectRef]:
        """`method` called on every learner replica at once (their collectives pair up); `collect` the result."""
        return [getattr(learner, method).remote(*args, **kwargs) for learner in self.learners]

    def teacher_head_to_learners(self) -> None:
        """The teacher's output head to every learner replica, once (frozen)."""
        collect(self._learners("set_teacher_head", self.teacher.output_head.remote()))

    def save_checkpoint(self, path: str, run_state: dict) -> str:
        return collect(self._learners("save_checkpoint", path, run_state))

    def load_checkpoint(self, path: str) -> int:
        return collect(self._learners("load_checkpoint", path))

    def rollout_samples(self, prompts: list[list[int]], *, seed: int, greedy: bool = False,
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
        return self._merge([lo for lo, hi in zip(bounds, bounds[1:]) if hi > lo], parts)

    def teacher_samples(self, prompts: list[list[int]], teacher_prompts: list[list[int]] | None, *,
                       seed: int) -> ray.ObjectRef:
        """Off-policy samples of `prompts` by the teacher (TeacherActor.sample): replica i answers the i-th
        consecutive share (seed + i), as `rollout_samples` shares prompts among the rollout replicas."""
        n = len(self.teachers)
        bounds = [round(i * len(prompts) / n) for i in range(n + 1)]
        shares = [(lo, t.sample.remote(prompts[lo:hi], None if teacher_prompts is None else teacher_prompts[lo:hi],
                                       seed=seed + i))
                  for i, (t, lo, hi) in enumerate(zip(self.teachers, bounds, bounds[1:])) if hi > lo]
        return self._merge([lo for lo, _ in shares], [ref for _, ref in shares])  # planned there

    def merge_samples(self, offsets: list[int], parts: list) -> ray.ObjectRef:
        """One batch of a step's parts (RolloutBatch refs or values) whose prompts start at `offsets` in the
        step's prompts: the student's samples and the off-policy ones."""
        return self._merge(offsets, parts)

    def _merge(self, offsets: list[int], parts: list) -> ray.ObjectRef:
        return _merge_rollouts.remote(offsets, self.cfg.learner.micro_batch_tokens, *parts)

    def teacher_scores(self, batch: ray.ObjectRef, *, teacher_prompts: list[list[int]] | None = None,
              hidden_states: bool | None = None) -> list[ray.ObjectRefGenerator]:
        """The teacher's scores of `batch`, streamed: one generator per teacher replica, replica i yielding the
        parts of the learner's micro-batches i, i + R, ... (TeacherActor.score) as it finishes each; `teacher_scored` waits for them."""
        kwargs = dict(teacher_prompts=teacher_prompts, hidden_states=hidden_states, replicas=len(self.teachers))
        return [t.score.remote(batch, replica=i, **kwargs) for i, t in enumerate(self.teachers)]

    @staticmethod
    def teacher_scored(scores: list[ray.ObjectRefGenerator]) -> None:
        """Until every teacher replica has scored its share (timing; nothing is fetched here)."""
        ray.wait([g.completed() for g in scores], num_returns=len(scores), fetch_local=False)

    @staticmethod
    def _parts(scores: list[ray.ObjectRefGenerator]) -> list[ray.ObjectRef]:
        """The refs of every micro-batch's part in plan order (part k from replica k % R). Passed to the learner
        inside a list, so Ray does not resolve them: the learner pulls one micro-batch's states at a time."""
        per_replica = [list(g) for g in scores]
        return [per_replica[k % len(scores)][k // len(scores)] for k in range(sum(map(len, per_replica)))]

    def learner_step(self, batch: ray.ObjectRef, scores: list[ray.ObjectRefGenerator]) -> list[ray.ObjectRef]:
        """Every learner replica's step on the batch (each its share of the micro-batches): `collect` the metrics."""
        refs = self._learners("train_step", batch, self._parts(scores))
        self._send_hidden()
        return refs

    def learner_evaluate(self, batch: ray.ObjectRef, scores: list[ray.ObjectRefGenerator]) -> list[ray.ObjectRef]:
        refs = self._learners("evaluate", batch, self._parts(scores))
        self._send_hidden()
        return refs

    def _send_hidden(self) -> None:
        # split: each teacher sends what it scored while the learner receives it (checked at the next sync)
        if state_outbox(self.cfg).sends:
            self._sends += [t.send_pending.remote() for t in self.teachers]

    def _load(self, replicas: list[int], updates: list[ray.ObjectRef]) -> list[ray.ObjectRef]:
        """Rollout replica i loads learner replica i % N's update (colocated, run.gpus=N: the one on its GPU)."""
        return [self.rollouts[i].load_weights.remote(updates[i % len(updates)]) for i in replicas]

    def sync_weights(self) -> int:
        """The learner's current weights to every rollout replica; returns the version they all hold."""
        updates = self._learners("export_weights")  # sharded: each replica gathers the whole weights
        loads = self._load(list(range(len(self.rollouts))), updates)
        broadcast = [self.learner.broadcast_weights.remote()] if weight_route(self.cfg).broadcasts else []
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
