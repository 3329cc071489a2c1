"""Evaluation's task accuracy, end to end: a prompt file with gold answers -> the prompt set -> greedy answers of
the real toy models -> decoding -> the answer verifier (opd/verify.py) -> `accuracy`, against a count made with
integer arithmetic; and the toy task's accuracies against the values recorded when the assets were built."""

import json
import math

import pytest
import torch
from transformers import AutoTokenizer

from opd.actors.engines.hf import HFEngine
from opd import toy
from opd.batch import RolloutBatch
from opd.config import DataConfig
from opd.prompt_sets import build_prompt_set, student_ids
from opd.programs.evaluation import accuracy


@pytest.fixture(scope="module")
def tokenizer(root):
    return AutoTokenizer.from_pretrained(root / "assets/toy/student")


def _engine(root, side, tokenizer):
    return HFEngine.from_pretrained(str(root / "assets/toy" / side), eos_id=tokenizer.eos_token_id,
                                    pad_id=tokenizer.pad_token_id)


def _sums(prompts) -> list[int]:
    return [int(p.text[:2]) + int(p.text[3:5]) for p in prompts]


@pytest.mark.parametrize("side", ["teacher", "student"])
def test_accuracy_through_the_verifier_equals_an_integer_count(root, tmp_path, tokenizer, side):
    """A JSONL of the toy's held-out problems with gold answers as plain integers (no leading zeros, unlike the
    model's 3-digit answers: the verifier compares numbers). The teacher gets most right, the student few."""
    problems = toy.problems("eval")[:200]
    path = tmp_path / "sums.jsonl"
    path.write_text("".join(json.dumps({"prompt": q, "answer": str(int(a.rstrip("|")))}) + "\n" for q, a in problems))
    data = DataConfig(source=str(path), num_eval_prompts=120, chat_template=False, max_prompt_tokens=16)
    prompt_set = build_prompt_set(data, 0, tokenizer, tokenizer)
    assert len(prompt_set.eval) == 120 and all(p.answer is not None for p in prompt_set.eval)

    batch = _engine(root, side, tokenizer).generate(student_ids(prompt_set.eval), max_new_tokens=6, greedy=True)
    got = accuracy(batch, prompt_set, tokenizer)
    # independent count: the response's digits before end-of-sequence, as an integer, equal to a + b
    eos = tokenizer.eos_token_id
    correct = []
    for response, total in zip(batch.responses(), _sums(prompt_set.eval), strict=True):
        digits = tokenizer.decode([t for t in response if t != eos])
        correct.append(digits.isdigit() and int(digits) == total)
    assert got == pytest.approx(sum(correct) / len(correct), abs=1e-12)
    assert (got > 0.9) if side == "teacher" else (0.05 < got < 0.5), got  # the models are what they are


def test_accuracy_counts_only_prompts_with_a_gold_answer(tmp_path, tokenizer):
    rows = [{"prompt": "01+02=", "answer": "3"}, {"prompt": "10+10=", "answer": "20"}, {"prompt": "05+05="},
            {"prompt": "40+02=", "answer": "42"}, {"prompt": "33+33=", "answer": "66"}]
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prompt_set = build_prompt_set(DataConfig(source=str(path), num_eval_prompts=4, chat_template=False), 0,
                                  tokenizer, tokenizer)
    by_text = {p.text: i for i, p in enumerate(prompt_set.eval)}
    # right, wrong, no gold, right without end-of-sequence, right
    answers = {"01+02=": "003|", "10+10=": "021|", "05+05=": "010|", "40+02=": "042", "33+33=": "066|"}
    right = {"01+02=", "40+02=", "33+33="}

    def batch_of(texts: dict[str, str]) -> RolloutBatch:
        order = list(texts)
        responses = [tokenizer(texts[t], add_special_tokens=False).input_ids for t in order]
        prompts = [list(prompt_set.eval[by_text[t]].student_ids) for t in order]
        return RolloutBatch(
            prompt_ids=torch.tensor([t for p in prompts for t in p]), prompt_lens=torch.tensor([len(p) for p in prompts]),
            response_ids=torch.tensor([t for r in responses for t in r]),
            response_lens=torch.tensor([len(r) for r in responses]),
            logprobs=torch.zeros(sum(map(len, responses))),
            prompt_index=torch.tensor([by_text[t] for t in order]), finish_reasons=["stop"] * len(order),
            policy_version=0).check()

    held_out = {text: answers[text] for text in by_text}  # four held out by the seeded split, one trains
    assert len(held_out) == 4 and "05+05=" in held_out
    want = len(right & set(held_out)) / 3  # three of the held-out four have a gold answer
    assert accuracy(batch_of(held_out), prompt_set, tokenizer) == pytest.approx(want)
    assert math.isnan(accuracy(batch_of({"05+05=": "010|"}), prompt_set, tokenizer))  # nothing to score


def test_toy_accuracies_equal_the_recorded_ones(root, tokenizer):
    """The engines' greedy answers, scored by the run's own checker on all 500 held-out problems, give the
    accuracies recorded in assets/toy/build_info.json when the models were trained."""
    info = json.loads((root / "assets/toy/build_info.json").read_text())
    prompt_set = build_prompt_set(DataConfig(num_eval_prompts=500), 0, tokenizer, tokenizer)
    for side in ("teacher", "student"):
        batch = _engine(root, side, tokenizer).generate(student_ids(prompt_set.eval), max_new_tokens=6, greedy=True)
        assert accuracy(batch, prompt_set, tokenizer) == pytest.approx(info[side]["eval_accuracy"], abs=1e-9), side


@pytest.mark.slow
def test_the_first_evaluation_does_not_depend_on_the_schedule(root, tmp_path, short_run):
    """A greedy evaluation of fixed models on a fixed held-out set gives the same numbers every time: two runs that
    differ in train.steps / train.eval_every (and so in the learning-rate schedule and the RNG use after step 0),
    in the loss and the learning rate (the session's short run: forward KL at 3e-3, 3 steps) record identical
    step-0 evaluations, sampled KL included (it samples with its own seed)."""
    from opd.metrics import read_jsonl

    from test_driver import _run

    b, _ = _run(root, tmp_path / "b", "--set", "train.steps=2", "--set", "train.eval_every=1", name="b")
    first_a, first_b = read_jsonl(short_run / "eval.jsonl")[0], read_jsonl(b / "eval.jsonl")[0]
    assert first_a["step"] == first_b["step"] == 0
    assert first_a == first_b
