"""The embedded toy world: fixed-width 2-digit addition in a 16-token vocabulary, and the models' shapes.

Everything the toy default needs lives here or in opd/toy_assets.py (which trains and saves the models), so a run
can start with no downloads:

* the task: ``"07+45="`` (6 tokens) -> ``"052|"`` (4 tokens, ``|`` is end-of-sequence), all 10,000 pairs
  ``a, b in 0..99``, 500 held out by a seeded permutation; ``Task`` describes any fixed-width task in the
  vocabulary (opd/chain.py's running sums are the other);
* a 16-token character-level tokenizer (HF ``tokenizers`` WordLevel, wrapped in ``PreTrainedTokenizerFast``);
* two ``Qwen3ForCausalLM`` configs: a teacher (2 x 128, ~0.53 M params) and a student (2 x 64, ~0.13 M);
* ``greedy_accuracy``: held-out exact match of greedy answers.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen3Config

from opd.models import save_tokenizer

# --------------------------------------------------------------------------------------------------------------
# Vocabulary and task
# --------------------------------------------------------------------------------------------------------------

PAD = "<pad>"
UNK = "<unk>"
BOS = "<s>"  # present for HF conventions; never added to sequences
EOS = "|"
VOCAB: tuple[str, ...] = (PAD, UNK, BOS, *"0123456789", "+", "=", EOS)
assert len(VOCAB) == 16 and VOCAB.index(PAD) == 0
TOKEN_TO_ID: dict[str, int] = {tok: i for i, tok in enumerate(VOCAB)}

NUM_PROMPT_TOKENS = 6  # "07+45="
NUM_ANSWER_TOKENS = 4  # "052|"
NUM_PROBLEMS = 10_000
NUM_EVAL_PROBLEMS = 500
SPLIT_SEED = 1234  # fixes the held-out split forever; changing it invalidates the committed assets
SPLITS = ("train", "eval")


def _prompt(a: int, b: int) -> str:
    return f"{a:02d}+{b:02d}="


def _answer(a: int, b: int) -> str:
    return f"{a + b:03d}{EOS}"


def _split_indices() -> dict[str, list[int]]:
    """Problem index ``i`` encodes ``(a, b) = divmod(i, 100)``; a seeded permutation picks the eval set."""
    gen = torch.Generator().manual_seed(SPLIT_SEED)
    perm = torch.randperm(NUM_PROBLEMS, generator=gen).tolist()
    # Sorted so that the order of problems in a split does not depend on the permutation's order.
    return {"eval": sorted(perm[:NUM_EVAL_PROBLEMS]), "train": sorted(perm[NUM_EVAL_PROBLEMS:])}


def problems(split: str) -> list[tuple[str, str]]:
    """``(prompt_text, answer_text)`` pairs of a split; the answer includes the trailing ``|``.

    ``train`` has 9,500 problems and ``eval`` 500; both are deterministic and disjoint.
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not one of {SPLITS}")
    return [(_prompt(*divmod(i, 100)), _answer(*divmod(i, 100))) for i in _split_indices()[split]]


def is_correct(prompt_text: str, response_text: str) -> bool:
    """Exact match of a decoded response to the sum of the prompt, formatted as 3 digits.

    The first ``|`` and everything after it are stripped before comparing, so ``"052|"``, ``"052"`` and
    ``"052|<pad>"`` are correct for ``"07+45="``; ``"52|"``, ``"0520|"``, ``"05|2"`` and any garbage are not.
    Raises ``ValueError`` only for a malformed *prompt* (a programming error); any response string is scored.
    """
    if (
        len(prompt_text) != NUM_PROMPT_TOKENS
        or prompt_text[2] != "+"
        or prompt_text[5] != "="
        or not (prompt_text[:2] + prompt_text[3:5]).isdigit()
    ):
        raise ValueError(f"prompt_text={prompt_text!r} is not of the form 'AA+BB='")
    a, b = int(prompt_text[:2]), int(prompt_text[3:5])
    return response_text.split(EOS, 1)[0] == f"{a + b:03d}"


# --------------------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Task:
    """A fixed-width task in the toy vocabulary: what `sft`, `greedy_accuracy` and `build_assets` train and score
    (the addition here; opd/chain.py's running sums)."""

    name: str
    problems: Callable[[str], list[tuple[str, str]]]  # split -> (prompt text, answer text ending with "|")
    is_correct: Callable[[str, str], bool]  # (prompt text, decoded response) -> exact match
    prompt_tokens: int
    answer_tokens: int
    # the models' max_position_embeddings (rotary: it bounds the positions the driver lets a run use, the weights
    # do not depend on it)
    max_positions: int = 32


ADDITION = Task("toy_addition", problems, is_correct, NUM_PROMPT_TOKENS, NUM_ANSWER_TOKENS)


def build_tokenizer(out_dir: str | os.PathLike[str]) -> PreTrainedTokenizerFast:
    """Build the character-level tokenizer, save it to ``out_dir`` and return it.

    Every character is one token (the pre-tokenizer isolates each character, WordLevel maps it to an id), the
    Fuse decoder joins tokens without spaces, and there is no post-processor, so nothing (no bos, no eos) is
    added automatically: ``tok("07+45=").input_ids`` has exactly 6 ids.
    """
    core = Tokenizer(models.WordLevel(vocab=TOKEN_TO_ID, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        bos_token=BOS,
        padding_side="left",  # decoder-only generation: prompts end where the response starts
        model_max_length=32,
    )
    save_tokenizer(tok, Path(out_dir))
    return tok



# --------------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------------

# Measured on the 2-core CPU box (batch 256 x 9 tokens, fwd+bwd+AdamW, 1 thread): eager 147-154 ms/step for the
# teacher and 53-63 ms for the student, sdpa 150-178 ms and 53-73 ms; eager was as fast or faster in 3 of 4 runs.
# (It is a construction-time choice: ``from_pretrained`` picks its own default unless told otherwise.)
ATTN_IMPLEMENTATION = "eager"


def _qwen3_config(*, num_layers: int, hidden: int, max_positions: int = 32) -> Qwen3Config:
    num_heads = 4
    config = Qwen3Config(
        vocab_size=len(VOCAB),
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        head_dim=hidden // num_heads,
        max_position_embeddings=max_positions,
        # Qwen3's own default theta; measured here it trained the teacher faster than theta 1e4 (for the default
        # seed 500 vs 550 steps to 97 %), although positions only go up to 10.
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        tie_word_embeddings=True,
        eos_token_id=TOKEN_TO_ID[EOS],
        pad_token_id=TOKEN_TO_ID[PAD],
        bos_token_id=TOKEN_TO_ID[BOS],
    )
    config._attn_implementation = ATTN_IMPLEMENTATION
    return config


def teacher_config(max_positions: int = 32) -> Qwen3Config:
    """2 layers x hidden 128, 4 heads of 32, FFN 512: ~0.53 M parameters."""
    return _qwen3_config(num_layers=2, hidden=128, max_positions=max_positions)


def student_config(max_positions: int = 32) -> Qwen3Config:
    """2 layers x hidden 64, 4 heads of 16, FFN 256: ~0.13 M parameters."""
    return _qwen3_config(num_layers=2, hidden=64, max_positions=max_positions)


def generation_config(task: Task = ADDITION) -> GenerationConfig:
    """Greedy decoding of exactly one answer (the addition's: 3 digits + ``|``)."""
    return GenerationConfig(
        max_new_tokens=task.answer_tokens,
        do_sample=False,
        eos_token_id=TOKEN_TO_ID[EOS],
        pad_token_id=TOKEN_TO_ID[PAD],
        bos_token_id=TOKEN_TO_ID[BOS],
    )


@torch.no_grad()
def greedy_accuracy(
    model: transformers.PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    split: str = "eval",
    *,
    limit: int | None = None,
    batch_size: int = 500,
    task: Task = ADDITION,
) -> float:
    """Greedy exact-match accuracy over the split's prompts (the first ``limit`` of them if given)."""
    items = task.problems(split)[:limit]
    if not items:
        raise ValueError(f"limit={limit} leaves no problems to score")
    was_training = model.training
    model.eval()
    gen_config = generation_config(task)
    num_correct = 0
    for start in range(0, len(items), batch_size):
        prompts = [p for p, _ in items[start : start + batch_size]]
        enc = tokenizer(prompts, return_tensors="pt", padding=True)
        out_BT = model.generate(**enc, generation_config=gen_config)
        new_ids_BN = out_BT[:, enc.input_ids.shape[1] :]
        # Keep special tokens: is_correct cuts at the first "|", so "05|2" cannot pass as "052".
        responses = tokenizer.batch_decode(new_ids_BN, skip_special_tokens=False)
        num_correct += sum(task.is_correct(p, r) for p, r in zip(prompts, responses, strict=True))
    model.train(was_training)
    return num_correct / len(items)
