"""Set-up every actor process does first."""

from __future__ import annotations

import os

import torch

from opd.config import Config, resolve_path
from opd.models import load_model, load_tokenizer


def init_process(cfg: Config) -> None:
    # Two cores and three actors: one torch thread each keeps phases from fighting over the CPU.
    torch.set_num_threads(cfg.run.threads_per_actor)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_transformers()


def quiet_transformers() -> None:
    """No per-actor progress bars or info chatter on the driver's console (Ray forwards actor output)."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def model_source(name: str) -> str:
    """A model setting as transformers takes it: the project-relative folder if it exists, else the hub id."""
    path = resolve_path(name)
    return str(path) if path.exists() else name


def special_ids(model_name: str) -> tuple[int, int, int]:
    """(eos id, pad id, tokenizer vocabulary size) of a model's tokenizer."""
    tokenizer = load_tokenizer(model_source(model_name))
    return tokenizer.eos_token_id, tokenizer.pad_token_id, len(tokenizer)


def load(cfg: Config, side: str, *, dtype: str | None = None):
    """The student or teacher model, in `dtype` (default: model.dtype) with the configured attention."""
    return load_model(model_source(getattr(cfg.model, side)), dtype=dtype or cfg.model.dtype,
                      attn_implementation=cfg.model.attn_implementation or None)
