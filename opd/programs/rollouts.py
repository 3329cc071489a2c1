"""Each step's prompts and the samples the learner trains on: the student's own (on-policy), and with
rollout.student_fraction < 1 off-policy ones for the step's last prompts (answered by the teacher or taken from
the dataset), in one batch; with run.overlap the next step's are sampled while the learner trains."""

from __future__ import annotations

import ray

from opd.config import Config
from opd.prompt_sets import gold_batch, student_ids, teacher_ids

# A step's sampling seed: train.seed * STEP_SEED_STRIDE + step (a prime stride keeps runs of different seeds apart
# for any number of steps); the teacher's off-policy samples draw from seed + TEACHER_SEED_OFFSET, so they never
# share a random stream with the student's samples of the same step.
STEP_SEED_STRIDE = 1_000_003
TEACHER_SEED_OFFSET = 500_009


def step_seed(cfg: Config, step: int) -> int:
    return cfg.train.seed * STEP_SEED_STRIDE + step


class Rollouts:
    """Each step's prompts, drawn from `stream` once, and their samples: sampled when the step starts, or with
    run.overlap while the previous step's learner trained. `tokenizer`: the student's (the dataset's answers,
    rollout.off_policy_source=dataset)."""

    def __init__(self, cfg: Config, actors, stream, tokenizer=None):
        self.cfg, self.actors, self.stream, self.tokenizer = cfg, actors, stream, tokenizer
        self.drawn: dict[int, list] = {}  # step -> its prompts (this step's and, with overlap, the next one's)
        self.upcoming = None  # run.overlap: (step, its samples) sampled ahead

    def take(self, step: int, resample: bool = False):
        """The step's prompts and samples (a ref, once they are all sampled): the ones sampled ahead, else (or with
        `resample`, after a restart) sampled now."""
        ahead, self.upcoming = self.upcoming, None
        self.drawn = {s: p for s, p in self.drawn.items() if s >= step}
        batch = ahead[1] if ahead and ahead[0] == step and not resample else self._sample(step)
        ray.wait([batch], fetch_local=False)  # timing only: the batch goes actor to actor
        return self.drawn[step], batch

    def prefetch(self, step: int) -> None:
        if self.cfg.run.overlap and step <= self.cfg.train.steps:
            self.upcoming = (step, self._sample(step))

    def wait_prefetched(self) -> None:
        """The samples taken ahead must be done before the sync rewrites the weights they are sampled with."""
        if self.upcoming is not None:
            ray.wait([self.upcoming[1]], fetch_local=False)

    def _sample(self, step: int):
        if step not in self.drawn:
            self.drawn[step] = self.stream.next_batch(self.cfg.train.prompts_per_step)
        prompts, r, seed = self.drawn[step], self.cfg.rollout, step_seed(self.cfg, step)
        if r.student_fraction == 1:  # on-policy; the hybrid: the student continues each prompt's gold prefix
            prefixes = [list(p.gold_prefix) for p in prompts] if self.cfg.data.gold_prefix_field else None
            return self.actors.rollout_samples(student_ids(prompts), seed=seed, prefixes=prefixes)
        k = round(r.student_fraction * len(prompts))  # the student's prompts; the rest are off-policy
        off = prompts[k:]
        if r.off_policy_source == "teacher":
            off_batch = self.actors.teacher_samples(student_ids(off), teacher_ids(off), seed=seed + TEACHER_SEED_OFFSET)
        else:
            off_batch = ray.put(gold_batch(off, self.tokenizer, num_samples=r.num_samples,
                                           max_new_tokens=r.max_new_tokens).planned(self.cfg.learner.micro_batch_tokens))
        if k == 0:
            return off_batch
        return self.actors.merge_samples([0, k], [self.actors.rollout_samples(student_ids(prompts[:k]), seed=seed),
                                                  off_batch])
