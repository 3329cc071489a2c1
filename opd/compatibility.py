"""The student/teacher compatibility check: both tokenizers give identical token ids (DESIGN.md "Vocabularies").

``check_compatible`` returns the valid vocabulary size; output rows beyond it are padding that the losses mask to
-inf. Every refusal is one ``ModelError`` line naming the first difference and the fix.
"""

from __future__ import annotations

from transformers import PretrainedConfig

from opd.models import ModelError

_SPECIAL_ROLES = ("bos_token", "eos_token", "pad_token", "unk_token")

# Strings whose ids must agree; every special token is also probed inside text (below).
PROBES: tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog.",
    "What is 2+3? The answer is 5.",
    "Ünïcödé: naïve café, 日本語のテキスト, Привет мир, emoji 🙂👍🏽",
    "def add(a, b):\n    return a + b  # sum\n\n{'k': [1, 2]}",
    "1234567890 3.14159 -0.5e-3 1,000,000 0x1F",
    "  leading and trailing  ",
    "tabs\t\tand\nnew\n\n\nlines     and      runs",
    "",
)


def _describe(vocab: dict[str, int], token: str) -> str:
    return f"id {vocab[token]}" if token in vocab else "missing"


def _first_vocab_difference(student: dict[str, int], teacher: dict[str, int]) -> str:
    """The differing token with the lowest id on either side (ties broken by the token string)."""
    differing = [tok for tok in student.keys() | teacher.keys() if student.get(tok) != teacher.get(tok)]
    return min(differing, key=lambda tok: (min(v for v in (student.get(tok), teacher.get(tok)) if v is not None), tok))


def check_compatible(student_tokenizer, teacher_tokenizer, student_config: PretrainedConfig,
                     teacher_config: PretrainedConfig) -> int:
    """The valid vocabulary size (``len`` of the shared tokenizer), or ``ModelError`` if the pair cannot be
    distilled token for token.

    Token ids travel end to end, so the two tokenizers must agree exactly: the same vocabulary, the same special
    tokens (bos/eos/pad/unk and the additional ones, by string and id), and the same ids on ``PROBES`` and on
    each special token inside text, with and without the tokenizer's own special tokens added. Each model's
    output rows (``config.vocab_size``) must cover the tokenizer; rows beyond it are padding (masked to -inf).
    """
    fix = "distil between models that share a tokenizer"
    s_vocab, t_vocab = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    if s_vocab != t_vocab:
        token = _first_vocab_difference(s_vocab, t_vocab)
        raise ModelError(f"student and teacher vocabularies differ at token {token!r} ({_describe(s_vocab, token)} "
                         f"in the student, {_describe(t_vocab, token)} in the teacher): {fix}")
    num_tokens = len(student_tokenizer)
    if len(teacher_tokenizer) != num_tokens:
        raise ModelError(f"student and teacher tokenizers have {num_tokens} and {len(teacher_tokenizer)} tokens: {fix}")
    if s_vocab and max(s_vocab.values()) >= num_tokens:
        # ids at or beyond len() would be masked as padding rows downstream
        token = max(s_vocab, key=s_vocab.get)
        raise ModelError(f"token {token!r} has id {s_vocab[token]} >= the tokenizer's size {num_tokens}: the "
                         f"vocabulary has holes; use a tokenizer with contiguous ids")

    for role in _SPECIAL_ROLES:
        s_token, t_token = getattr(student_tokenizer, role), getattr(teacher_tokenizer, role)
        s_id, t_id = getattr(student_tokenizer, f"{role}_id"), getattr(teacher_tokenizer, f"{role}_id")
        if (s_token, s_id) != (t_token, t_id):
            raise ModelError(f"student and teacher differ in {role}: {s_token!r} (id {s_id}) in the student, "
                             f"{t_token!r} (id {t_id}) in the teacher: {fix} (or set the same {role} on both)")
    s_special, t_special = set(student_tokenizer.all_special_tokens), set(teacher_tokenizer.all_special_tokens)
    if s_special != t_special:
        token = min(s_special ^ t_special)
        side = "student" if token in s_special else "teacher"
        raise ModelError(f"special token {token!r} is special in the {side} only: {fix} (or add it to both)")

    probes = [*PROBES, *(f"x{tok}y {tok} z{tok}" for tok in sorted(s_special))]
    for probe in probes:
        for add_special_tokens in (False, True):
            s_ids = student_tokenizer(probe, add_special_tokens=add_special_tokens)["input_ids"]
            t_ids = teacher_tokenizer(probe, add_special_tokens=add_special_tokens)["input_ids"]
            if s_ids != t_ids:
                raise ModelError(f"student and teacher tokenize {probe!r} (add_special_tokens={add_special_tokens}) "
                                 f"differently: {s_ids[:16]} vs {t_ids[:16]}: {fix}")

    for side, config in (("student", student_config), ("teacher", teacher_config)):
        num_rows = _text_config(config).vocab_size
        if num_rows is None or num_rows < num_tokens:
            raise ModelError(f"the {side} has {num_rows} output rows (config.vocab_size) for a tokenizer of "
                             f"{num_tokens} tokens: give the {side} the tokenizer it was trained with, or resize its "
                             f"embeddings (resize_token_embeddings)")
    return num_tokens


def _text_config(config: PretrainedConfig) -> PretrainedConfig:
    # a vision-language checkpoint (e.g. gemma-3-4b-it) keeps the language model's sizes in its text config
    return config.get_text_config() if hasattr(config, "get_text_config") else config
