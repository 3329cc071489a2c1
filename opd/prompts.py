"""Prompt rendering: records -> token ids, with the student's chat template (and optionally the teacher's own).

The response token ids are the same for both models; only the prompt prefix may differ. When the teacher
renders its own prompt (its template or system prompt), the teacher scores `teacher_prompt + response` while
the student trains on `student_prompt + response`.
"""

from __future__ import annotations

from collections.abc import Callable

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class Prompt:
    student_ids: tuple[int, ...]  # the prompt as the student sees it (and generates from)
    teacher_ids: tuple[int, ...] | None  # None: the teacher sees the student's prompt
    answer: str | None  # gold answer, when the data has one
    text: str  # the raw prompt (or last user message), for logs and checkers
    # the hybrid (data.gold_prefix_field): the gold text's first tokens, which open the assistant turn; the student
    # continues after them
    gold_prefix: tuple[int, ...] = ()


def _messages(prompt, system_prompt: str) -> list[dict]:
    messages = [dict(m) for m in prompt] if not isinstance(prompt, str) else [{"role": "user", "content": prompt}]
    if system_prompt and not any(m.get("role") == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def render_ids(prompt, tokenizer: PreTrainedTokenizerBase, *, chat_template: bool, system_prompt: str = "",
               enable_thinking: bool | None = None) -> list[int]:
    """Token ids of one prompt: the chat template with the generation prompt appended, or the plain text."""
    if not chat_template:
        text = prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)
        return tokenizer(text, add_special_tokens=False).input_ids
    if tokenizer.chat_template is None:
        raise ValueError(f"{tokenizer.name_or_path}: the tokenizer has no chat template; set "
                         f"data.chat_template=false to use the prompt text as is")
    extra = {} if enable_thinking is None else {"enable_thinking": enable_thinking}  # Qwen3 thinking mode
    ids = tokenizer.apply_chat_template(_messages(prompt, system_prompt), add_generation_prompt=True,
                                        tokenize=True, **extra)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


def render(records, student_tokenizer: PreTrainedTokenizerBase, teacher_tokenizer: PreTrainedTokenizerBase, *,
           chat_template: bool, max_prompt_tokens: int, system_prompt: str = "", teacher_template: bool = False,
           teacher_system_prompt: str | None = None, enable_thinking: bool | None = None,
           gold_prefix: Callable[[object], tuple[int, ...]] | None = None) -> tuple[list[Prompt], int]:
    """Prompts for `records` (objects with `.prompt` and `.answer`) and the number skipped for being longer than
    `max_prompt_tokens` (on either side). teacher_template: render the teacher's prompt with the teacher's
    tokenizer and template; teacher_system_prompt: the teacher's own system prompt (None = the student's);
    gold_prefix: each record's gold prefix ids (the hybrid)."""
    own_teacher = teacher_template or (teacher_system_prompt is not None and teacher_system_prompt != system_prompt)
    prompts, too_long = [], 0
    for record in records:
        student = render_ids(record.prompt, student_tokenizer, chat_template=chat_template,
                             system_prompt=system_prompt, enable_thinking=enable_thinking)
        teacher = None
        if own_teacher:
            teacher = render_ids(record.prompt, teacher_tokenizer if teacher_template else student_tokenizer,
                                 chat_template=chat_template,
                                 system_prompt=system_prompt if teacher_system_prompt is None else teacher_system_prompt,
                                 enable_thinking=enable_thinking)
        if len(student) > max_prompt_tokens or (teacher is not None and len(teacher) > max_prompt_tokens):
            too_long += 1
            continue
        text = record.prompt if isinstance(record.prompt, str) else record.prompt[-1]["content"]
        prompts.append(Prompt(tuple(student), None if teacher is None else tuple(teacher), record.answer, text,
                              gold_prefix(record) if gold_prefix else ()))
    return prompts, too_long
