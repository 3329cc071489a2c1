"""Set-up every actor process does first."""

from __future__ import annotations

import os

import torch
from transformers import AutoTokenizer

from opd.config import Config, resolve_path


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


def special_ids(model_path: str) -> tuple[int, int, int]:
    """(eos id, pad id, tokenizer vocabulary size) of a model folder's tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_path(model_path))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return tokenizer.eos_token_id, pad_id, len(tokenizer)
