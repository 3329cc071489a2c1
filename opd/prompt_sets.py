"""Prompt sets for a run (the toy task or a dataset file) and the training stream over them, with a cursor that a
checkpoint can save and restore."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerBase

from opd import toy
from opd.batch import DATASET, RolloutBatch
from opd.config import ConfigError, DataConfig, resolve_path
from opd.prompts import Prompt, render


@dataclass
class PromptSet:
    train: list[Prompt]
    eval: list[Prompt]
    # (prompt, decoded response) -> correct?; None when the prompt has no gold answer
    checker: Callable[[Prompt, str], bool | None]
    counts: dict[str, int] = field(default_factory=dict)  # data/* counters for the run's records


def _embedded_tasks() -> dict:
    """data.source names of the embedded tasks (toy.Task): the addition of the default, the running sums."""
    from opd import chain

    return {toy.ADDITION.name: toy.ADDITION, chain.TASK.name: chain.TASK}


def _answer_checker(prompt: Prompt, response: str) -> bool | None:
    from opd.verify import is_correct

    return None if prompt.answer is None else is_correct(response, prompt.answer)


def build_prompt_set(data: DataConfig, seed: int, student_tokenizer: PreTrainedTokenizerBase,
                     teacher_tokenizer: PreTrainedTokenizerBase) -> PromptSet:
    """Load, split and render the prompts; every data error is a ConfigError raised before any work starts."""
    def prefix(text: str | None) -> tuple[int, ...]:
        """The hybrid's gold prefix: the first data.gold_prefix_max_tokens tokens of the gold text (0: all of
        them), its end-of-sequence left out (the student writes the end)."""
        ids = student_tokenizer(text or "", add_special_tokens=False).input_ids
        ids = ids[:-1] if ids and ids[-1] == student_tokenizer.eos_token_id else ids
        return tuple(ids[: data.gold_prefix_max_tokens or None])

    field, task = data.gold_prefix_field, _embedded_tasks().get(data.source)
    if task is not None:
        if field not in ("", "answer"):
            raise ConfigError(f"data.gold_prefix_field={field!r}: data.source={data.source} has only its answers; "
                              f"use data.gold_prefix_field=answer")

        def prompts(split):
            return [Prompt(tuple(student_tokenizer(q, add_special_tokens=False).input_ids), None, a, q,
                           prefix(a) if field else ()) for q, a in task.problems(split)]

        return PromptSet(train=prompts("train"), eval=prompts("eval")[: data.num_eval_prompts],
                         checker=lambda prompt, response: task.is_correct(prompt.text, response))

    from opd.prompt_files import DatasetError, load_records, split_records

    try:
        loaded = load_records(resolve_path(data.source), prefix_field=field if field not in ("", "answer") else None)
        if field == "answer" and loaded.answer_field is None and not any(r.answer for r in loaded.records):
            raise DatasetError(f"{data.source}: data.gold_prefix_field=answer, but it has no gold answers (fields "
                               f"answer, solution or a final assistant message)")
        train_records, eval_records = split_records(loaded.records, num_eval=data.num_eval_prompts, seed=seed)
        kw = dict(chat_template=data.chat_template, max_prompt_tokens=data.max_prompt_tokens,
                  system_prompt=data.system_prompt, teacher_template=data.teacher_template == "teacher",
                  teacher_system_prompt=data.teacher_system_prompt or None, enable_thinking=data.enable_thinking,
                  gold_prefix=None if not field else lambda r: prefix(r.answer if field == "answer" else r.gold_prefix))
        train, train_long = render(train_records, student_tokenizer, teacher_tokenizer, **kw)
        evaluation, eval_long = render(eval_records, student_tokenizer, teacher_tokenizer, **kw)
    except (DatasetError, ValueError) as e:
        raise ConfigError(f"data.source: {e}") from None  # the message names the file (and line)
    if not train:
        raise ConfigError(f"data.source={data.source}: all {len(train_records)} training prompts are longer than "
                          f"data.max_prompt_tokens={data.max_prompt_tokens}; raise the limit")
    if not evaluation:
        raise ConfigError(f"data.source={data.source}: every held-out prompt is longer than "
                          f"data.max_prompt_tokens={data.max_prompt_tokens}; raise the limit")
    counts = {"data/prompts/train": len(train), "data/prompts/eval": len(evaluation),
              "data/skipped/too_long": train_long + eval_long, "data/skipped/empty": loaded.num_skipped_empty}
    return PromptSet(train=train, eval=evaluation, checker=_answer_checker, counts=counts)


class PromptStream:
    """Training prompts in a seeded order, reshuffled each epoch; `state()` / `load_state()` for resume."""

    def __init__(self, prompts: list[Prompt], seed: int):
        self.prompts = prompts
        self.seed = seed
        self.epoch, self.cursor = 0, 0
        self._order = self._shuffle()

    def _shuffle(self) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(len(self.prompts), generator=generator).tolist()

    def next_batch(self, num_prompts: int) -> list[Prompt]:
        out = []
        while len(out) < num_prompts:
            if self.cursor == len(self._order):
                self.epoch, self.cursor = self.epoch + 1, 0
                self._order = self._shuffle()
            out.append(self.prompts[self._order[self.cursor]])
            self.cursor += 1
        return out

    def state(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed}

    def load_state(self, state: dict) -> None:
        self.seed, self.epoch, self.cursor = state["seed"], state["epoch"], state["cursor"]
        self._order = self._shuffle()


def student_ids(prompts: list[Prompt]) -> list[list[int]]:
    return [list(p.student_ids) for p in prompts]


def teacher_ids(prompts: list[Prompt]) -> list[list[int]] | None:
    """The teacher's prompt per prompt, or None when it sees the student's."""
    if all(p.teacher_ids is None for p in prompts):
        return None
    return [list(p.student_ids if p.teacher_ids is None else p.teacher_ids) for p in prompts]


def gold_batch(prompts: list[Prompt], tokenizer: PreTrainedTokenizerBase, *, num_samples: int,
               max_new_tokens: int) -> RolloutBatch:
    """Off-policy samples from the data (rollout.off_policy_source=dataset): each prompt's gold answer as the
    student's tokenizer writes it, ending with end-of-sequence ("length" when `max_new_tokens` cuts it first),
    `num_samples` times, as sampled responses come; log-probs 0 (no sampler drew them)."""
    eos = tokenizer.eos_token_id
    responses, reasons = [], []
    for p in prompts:
        ids = tokenizer(p.answer, add_special_tokens=False).input_ids
        ids = ids if ids and ids[-1] == eos else ids + [eos]  # the toy's answers end with it already
        responses += [ids[:max_new_tokens]] * num_samples
        reasons += ["stop" if len(ids) <= max_new_tokens else "length"] * num_samples
    return RolloutBatch.from_lists([list(p.student_ids) for p in prompts for _ in range(num_samples)], responses,
                                   prompt_index=torch.arange(len(prompts)).repeat_interleave(num_samples),
                                   finish_reasons=reasons, policy_version=-1, source=DATASET)
