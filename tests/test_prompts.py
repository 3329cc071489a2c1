"""Prompt rendering with chat templates, and the teacher's own template: only the teacher's prompt ids change."""

from dataclasses import dataclass

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from opd.actors.teacher import TeacherActor
from conftest import whole
from opd.batch import RolloutBatch
from opd.presets import tiny_cpu
from opd.prompts import render, render_ids

STUDENT_TEMPLATE = ("{% for m in messages %}{{ m['content'] }}{% endfor %}"
                    "{% if add_generation_prompt %}={% endif %}")
TEACHER_TEMPLATE = "<s>" + STUDENT_TEMPLATE  # the teacher's template adds a prefix token


@dataclass(frozen=True)
class Record:
    prompt: object
    answer: str | None = None


@pytest.fixture
def tokenizers(root):
    student = AutoTokenizer.from_pretrained(root / "assets/toy/student")
    teacher = AutoTokenizer.from_pretrained(root / "assets/toy/teacher")
    student.chat_template, teacher.chat_template = STUDENT_TEMPLATE, TEACHER_TEMPLATE
    return student, teacher


def test_chat_template_renders_the_generation_prompt(tokenizers):
    student, _ = tokenizers
    ids = render_ids("07+45", student, chat_template=True)
    assert student.decode(ids) == "07+45="
    assert render_ids("07+45=", student, chat_template=False) == ids
    messages = ({"role": "user", "content": "07+45"},)
    assert render_ids(messages, student, chat_template=True) == ids


def test_teacher_template_changes_only_the_teacher_prompt(tokenizers):
    student, teacher = tokenizers
    records = [Record("07+45", "052"), Record("99+01", "100")]
    same, _ = render(records, student, teacher, chat_template=True, max_prompt_tokens=64)
    own, _ = render(records, student, teacher, chat_template=True, max_prompt_tokens=64, teacher_template=True)
    assert [p.student_ids for p in own] == [p.student_ids for p in same]
    assert all(p.teacher_ids is None for p in same)
    assert [p.teacher_ids for p in own] == [(teacher.convert_tokens_to_ids("<s>"),) + p.student_ids for p in same]


def test_over_long_prompts_are_skipped_and_counted(tokenizers):
    student, teacher = tokenizers
    records = [Record("07+45"), Record("1234567890" * 3), Record("12+34")]
    prompts, too_long = render(records, student, teacher, chat_template=True, max_prompt_tokens=8)
    assert too_long == 1 and [student.decode(p.student_ids) for p in prompts] == ["07+45=", "12+34="]
    # the teacher's longer rendering counts too
    prompts, too_long = render(records[:1], student, teacher, chat_template=True, max_prompt_tokens=6,
                               teacher_template=True)
    assert too_long == 1 and prompts == []


def test_missing_chat_template_is_a_clear_error(root):
    plain = AutoTokenizer.from_pretrained(root / "assets/toy/student")
    with pytest.raises(ValueError, match="no chat template; set data.chat_template=false"):
        render_ids("07+45", plain, chat_template=True)


def test_teacher_scores_the_same_response_after_its_own_prompt(root):
    """The response ids are untouched; the teacher's hidden states are those of teacher_prompt + response."""
    teacher = TeacherActor(tiny_cpu())
    student_prompt, teacher_prompt, response = [3, 4, 14, 5, 6, 15], [2, 3, 4, 14, 5, 6, 15], [3, 7, 4, 13]
    batch = RolloutBatch(prompt_ids=torch.tensor(student_prompt), prompt_lens=torch.tensor([6]),
                         response_ids=torch.tensor(response), response_lens=torch.tensor([4]),
                         logprobs=torch.zeros(4), prompt_index=torch.tensor([0]), finish_reasons=["stop"],
                         policy_version=0).check().planned(0)
    scores = whole(teacher.score(batch, teacher_prompts=[teacher_prompt]), batch)
    model = AutoModelForCausalLM.from_pretrained(root / "assets/toy/teacher", dtype=torch.float32)
    with torch.no_grad():
        hidden = model.model(input_ids=torch.tensor([teacher_prompt + response])).last_hidden_state[0]
    assert torch.allclose(scores, hidden[len(teacher_prompt) - 1: -1], atol=1e-5)
    plain = whole(teacher.score(batch), batch)
    assert not torch.allclose(plain, scores)
