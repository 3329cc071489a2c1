"""Prompt streams: token ids for each step, with a cursor that a checkpoint can save and restore."""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

from opd import toy


class PromptStream:
    """Training prompts in a seeded order, reshuffled each epoch; `state()` / `load_state()` for resume."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, seed: int):
        texts = [prompt for prompt, _ in toy.problems("train")]
        self.ids = [tokenizer(t, add_special_tokens=False).input_ids for t in texts]
        self.seed = seed
        self.epoch, self.cursor = 0, 0
        self._order = self._shuffle()

    def _shuffle(self) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(len(self.ids), generator=generator).tolist()

    def next_batch(self, num_prompts: int) -> list[list[int]]:
        out = []
        while len(out) < num_prompts:
            if self.cursor == len(self._order):
                self.epoch, self.cursor = self.epoch + 1, 0
                self._order = self._shuffle()
            out.append(self.ids[self._order[self.cursor]])
            self.cursor += 1
        return out

    def state(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed}

    def load_state(self, state: dict) -> None:
        self.seed, self.epoch, self.cursor = state["seed"], state["epoch"], state["cursor"]
        self._order = self._shuffle()


def eval_prompts(tokenizer: PreTrainedTokenizerBase, num_prompts: int) -> tuple[list[list[int]], list[str]]:
    """The first `num_prompts` held-out prompts: (token ids, texts)."""
    texts = [prompt for prompt, _ in toy.problems("eval")][:num_prompts]
    return [tokenizer(t, add_special_tokens=False).input_ids for t in texts], texts
