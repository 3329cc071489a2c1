"""Held-out evaluation: exact KL to the teacher on the student's own samples, and task accuracy."""

from __future__ import annotations

import math

import ray
from transformers import PreTrainedTokenizerBase

from opd.batch import RolloutBatch
from opd.prompt_sets import PromptSet, student_ids, teacher_ids

EVAL_SEED = 1_234_567  # held-out samples use their own seed, so evaluation does not shift training's


def accuracy(batch: RolloutBatch, prompt_set: PromptSet, tokenizer: PreTrainedTokenizerBase) -> float:
    """Mean correctness over the prompts that have a gold answer (nan when none has)."""
    texts = tokenizer.batch_decode(batch.responses(), skip_special_tokens=True)
    verdicts = [prompt_set.checker(prompt_set.eval[i], text)
                for i, text in zip(batch.prompt_index.tolist(), texts, strict=True)]
    scored = [v for v in verdicts if v is not None]
    return sum(scored) / len(scored) if scored else math.nan


def evaluate(actors, prompt_set: PromptSet, tokenizer: PreTrainedTokenizerBase, max_new_tokens: int,
             teacher_accuracy: float | None = None) -> dict[str, float]:
    """`teacher_accuracy`: pass the cached value after the first evaluation (the teacher does not change)."""
    prompts, teacher_prompts = student_ids(prompt_set.eval), teacher_ids(prompt_set.eval)
    greedy = actors.rollout_samples(prompts, seed=EVAL_SEED, greedy=True)
    sampled = actors.rollout_samples(prompts, seed=EVAL_SEED)
    kl = actors.learner_evaluate(sampled, actors.teacher_scores(sampled, hidden_states=True,
                                                                teacher_prompts=teacher_prompts))
    teacher = None if teacher_accuracy is not None else actors.teacher.generate.remote(
        teacher_prompts or prompts, max_new_tokens=max_new_tokens)
    out = {"eval/accuracy/student": accuracy(ray.get(greedy), prompt_set, tokenizer)}
    # the learner's result before the teacher's answers: in split mode the teacher runs `generate` only after its
    # hidden-state sends, which a learner that failed never receives; its error is raised here instead of a hang
    kl_metrics = actors.learner_result(kl)
    out["eval/accuracy/teacher"] = (teacher_accuracy if teacher is None
                                    else accuracy(ray.get(teacher), prompt_set, tokenizer))
    out.update({f"eval/{k}": v for k, v in kl_metrics.items()})
    return out


class HeldOut:
    """The run's held-out evaluations: before the first step (a resumed run has its own in eval.jsonl), every
    train.eval_every steps and after the last; each logged. The teacher's accuracy is taken once."""

    def __init__(self, cfg, actors, prompt_set: PromptSet, log, tokenizer: PreTrainedTokenizerBase):
        self.cfg, self.actors, self.prompt_set, self.log, self.tokenizer = cfg, actors, prompt_set, log, tokenizer
        self.before: dict | None = log.eval_rows[0] if log.eval_rows else None
        self.last = log.eval_rows[-1] if log.eval_rows else self.run(0)
        self.before = self.before or self.last

    def due(self, step: int) -> bool:
        every = self.cfg.train.eval_every
        return step == self.cfg.train.steps or bool(every and step % every == 0)

    def run(self, step: int) -> dict[str, float]:
        teacher = self.before["eval/accuracy/teacher"] if self.before else None
        self.last = evaluate(self.actors, self.prompt_set, self.tokenizer, self.cfg.rollout.max_new_tokens, teacher)
        self.log.log_eval(step, self.last)
        return self.last
