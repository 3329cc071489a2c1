"""Held-out evaluation: exact KL to the teacher on the student's own samples, and task accuracy."""

from __future__ import annotations

import ray
from transformers import PreTrainedTokenizerBase

from opd import toy
from opd.batch import RolloutBatch

EVAL_SEED = 1_234_567  # held-out samples use their own seed, so evaluation does not shift training's


def accuracy(batch: RolloutBatch, prompt_texts: list[str], tokenizer: PreTrainedTokenizerBase) -> float:
    texts = tokenizer.batch_decode(batch.responses(), skip_special_tokens=False)
    prompts = [prompt_texts[i] for i in batch.prompt_index.tolist()]
    return sum(toy.is_correct(p, t) for p, t in zip(prompts, texts, strict=True)) / len(texts)


def evaluate(actors, prompts: list[list[int]], prompt_texts: list[str], tokenizer: PreTrainedTokenizerBase,
             max_new_tokens: int, teacher_accuracy: float | None = None) -> dict[str, float]:
    """`teacher_accuracy`: pass the cached value after the first evaluation (the teacher does not change)."""
    greedy = actors.rollout.generate.remote(prompts, seed=EVAL_SEED, greedy=True)
    sampled = actors.rollout.generate.remote(prompts, seed=EVAL_SEED)
    kl = actors.learner.evaluate.remote(sampled, actors.teacher.score.remote(sampled, hidden_states=True))
    teacher = None if teacher_accuracy is not None else actors.teacher.generate.remote(
        prompts, max_new_tokens=max_new_tokens)
    out = {"eval/accuracy/student": accuracy(ray.get(greedy), prompt_texts, tokenizer)}
    out["eval/accuracy/teacher"] = (teacher_accuracy if teacher is None
                                    else accuracy(ray.get(teacher), prompt_texts, tokenizer))
    out.update({f"eval/{k}": v for k, v in ray.get(kl).items()})
    return out
