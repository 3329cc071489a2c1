"""What a memory plan reads: the two models' shapes (config.json only, no weights) and the step's shape.

A model's shape comes from a local folder's config.json, `assets/shapes/` for the anchors' hub ids, or the Hugging
Face cache (no download); the step's from the config (prompts x samples, the longest prompt, max_new_tokens).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from opd.config import Config, resolve_path
from opd.roofline import DecoderShape

SHAPES_DIR = "assets/shapes"


@dataclass(frozen=True)
class Arch:
    """A decoder's shape plus what the memory terms need beyond roofline's DecoderShape."""

    shape: DecoderShape
    params: int  # all parameters, norms and biases included (a tied head counted once)
    qk_norm: bool  # Qwen3 / Gemma3: RMSNorm on q and k (two more saved tensors per layer)
    source: str  # where the shape came from

    @classmethod
    def of(cls, config: dict, source: str = "") -> Arch:
        text = {**config, **config.get("text_config", {})}  # vision-language checkpoints: the language model
        s = DecoderShape.of(text)
        d, q, kv = s.hidden, s.heads * s.head_dim, s.kv_heads * s.head_dim
        model_type = text.get("model_type", "")
        qk_norm = model_type.startswith(("qwen3", "gemma3"))
        norms = 4 if model_type.startswith("gemma") else 2
        bias = q + 2 * kv if model_type == "qwen2" else (q + 2 * kv + d if text.get("attention_bias") else 0)
        layer = s.layer_matmul_params + norms * d + bias + (2 * s.head_dim if qk_norm else 0)
        params = s.head_params * (1 if s.tied else 2) + s.layers * layer + d
        return cls(s, params, qk_norm, source)


def hub_shape_file(name: str) -> Path:
    """assets/shapes/<name after the slash, lower case>.json: Qwen/Qwen2.5-1.5B-Instruct -> qwen2.5-1.5b-instruct."""
    return resolve_path(SHAPES_DIR) / f"{name.rsplit('/', 1)[-1].lower()}.json"


def model_arch(name: str) -> Arch | None:
    """The shape of model setting `name`, from config.json only: a local folder, the shape files of the anchors'
    hub ids, or the Hugging Face cache (no download). None when none of them has it."""
    candidates = [resolve_path(name) / "config.json", hub_shape_file(name)]
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "config.json") if name.count("/") == 1 else None
        if isinstance(cached, str):
            candidates.append(Path(cached))
    except Exception:  # noqa: BLE001 - an invalid repo id or an unusable cache: no cached shape
        pass
    for path in candidates:
        if path.is_file():
            return Arch.of(json.loads(path.read_text()), str(path))
    return None


@dataclass(frozen=True)
class Step:
    num_sequences: int  # prompts x samples of a step
    prompt_tokens: int  # the longest prompt (a bound)
    response_tokens: int  # rollout.max_new_tokens (a bound)
    num_eval_sequences: int = 0  # evaluation: held-out prompts x samples

    @property
    def seq_len(self) -> int:
        return self.prompt_tokens + self.response_tokens

    @property
    def tokens(self) -> int:
        return self.num_sequences * self.seq_len

    def micro_batch(self, budget: int, num_sequences: int | None = None) -> tuple[int, int, bool]:
        """(tokens, response tokens, packs several sequences) of the largest micro-batch under `budget`
        (0: the whole batch; a sequence longer than the budget gets one of its own; RolloutBatch.micro_batches)."""
        total = (self.num_sequences if num_sequences is None else num_sequences) * self.seq_len
        m = total if budget <= 0 else min(total, max(budget, self.seq_len))
        return m, math.ceil(m * self.response_tokens / self.seq_len), m > self.seq_len


def step_of(cfg: Config, prompt_tokens: int | None = None) -> Step:
    """The step the plan bounds: the bench's prompt length, else `prompt_tokens` (preflight passes the prompt set's
    longest), else data.max_prompt_tokens."""
    if prompt_tokens is None:
        prompt_tokens = cfg.bench.prompt_tokens if cfg.bench.enabled else cfg.data.max_prompt_tokens
    samples = cfg.rollout.num_samples
    return Step(cfg.train.prompts_per_step * samples, prompt_tokens, cfg.rollout.max_new_tokens,
                cfg.data.num_eval_prompts * samples)
