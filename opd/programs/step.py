"""One OPD step over the run's actors: rollout -> teacher -> learner -> sync, each phase timed. The training loop
(opd/programs/train.py) and the benchmark (opd/programs/bench.py) both call `Step`."""

from __future__ import annotations

import time

from opd.config import Config


class Step:
    """One step of four phases over the run's actors, each timed by `PhaseClock`; the training loop and the
    benchmark (opd/programs/bench.py) both call it. A rollout or teacher process that dies mid-step is restarted
    by Ray and the step retried around it (`_restarting`); run.overlap samples the next step while the learner
    trains (`Rollouts.prefetch`)."""

    def __init__(self, cfg: Config, actors, rollouts, *, say, run_dir):
        self.cfg, self.actors, self.rollouts, self.say, self.run_dir = cfg, actors, rollouts, say, run_dir
        self.restarts = 0

    def __call__(self, step: int) -> dict:
        """rollout -> teacher -> learner -> sync; the step's metrics with each phase's time."""
        self.restarts, clock, done = 0, PhaseClock(), {}
        metrics, version = self._restarting(step, lambda retry: self._phases(step, clock, done, retry))
        if version != metrics["policy/version"]:
            raise RuntimeError(f"engine holds weights v{version}, learner is at v{metrics['policy/version']}")
        return {**metrics, **clock.timings(metrics["response/tokens/sum"]), "step/actor_restarts": float(self.restarts)}

    def _phases(self, step: int, clock: PhaseClock, done: dict, retry: bool):
        """The four phases. The engines hold the weights of the last sync: the samples are on-policy (with
        run.overlap one version behind). A retry after the learner stepped only syncs again."""
        if "metrics" not in done:
            prompts, batch = clock.timed("rollout", self.rollouts.take, step, retry)  # resampled on a retry
            scores = clock.timed("teacher", self._teacher, prompts, batch)  # one part per learner micro-batch
            done["metrics"] = clock.timed("train", self._learner, step, batch, scores)
            clock.timed("overlap_wait", self.rollouts.wait_prefetched)  # step + 1's samples, before the sync
        return done["metrics"], clock.timed("sync", self.actors.sync_weights)  # the engines hold the new weights

    def _teacher(self, prompts, batch):
        from opd.prompt_sets import teacher_ids

        scores = self.actors.teacher_scores(batch, teacher_prompts=teacher_ids(prompts))
        self.actors.teacher_scored(scores)  # timing only: the parts go teacher to learner
        return scores

    def _learner(self, step: int, batch, scores) -> dict:
        training = self.actors.learner_step(batch, scores)
        self.rollouts.prefetch(step + 1)  # run.overlap: the next step's rollout, sampled while the learner trains
        return self.actors.learner_result(training)

    def _restarting(self, step: int, phases):
        """`phases(retry)`, run again after Ray restarted a rollout or teacher process that died during them (with
        retry=True: the step's prompts are sampled again, same seed, by the restored weights). A dead learner, a
        split-mode run or run.max_actor_restarts=0 stops the run instead (Actors.recover)."""
        import ray

        retry = False
        while True:
            try:
                return phases(retry)
            except ray.exceptions.RayActorError as e:
                self.restarts, retry = self.restarts + 1, True
                self.say(f"step {step}: {type(e).__name__}; restarting the actor and retrying the step")
                self.actors.recover(step, e, self.run_dir)


class PhaseClock:
    """A step's wall time per phase: each phase ends when it is marked, and lasts from the previous mark."""

    PHASES = ("rollout", "teacher", "train", "overlap_wait", "sync")

    def __init__(self):
        self.marks = {"start": time.perf_counter()}

    def timed(self, phase: str, fn, *args, **kwargs):
        """fn(...), the phase ending when it returns."""
        out = fn(*args, **kwargs)
        self.marks[phase] = time.perf_counter()
        return out

    def timings(self, tokens: float) -> dict[str, float]:
        t = [self.marks["start"]] + [self.marks[p] for p in self.PHASES]
        out = {f"timing/{p}_s": b - a for p, a, b in zip(self.PHASES, t, t[1:])}
        return {**out, "timing/step_s": t[-1] - t[0], "throughput/tokens_per_s": tokens / (t[-1] - t[0])}
