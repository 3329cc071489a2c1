"""The embedded toy world: task, tokenizer and the committed assets in ``assets/toy``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from opd import toy, toy_assets

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "toy"


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(ASSETS / "student")


def test_vocab() -> None:
    assert len(toy.VOCAB) == 16 and len(set(toy.VOCAB)) == 16
    assert toy.VOCAB[0] == toy.PAD == "<pad>"
    assert toy.EOS == "|" and toy.EOS in toy.VOCAB


def test_tokenizer_round_trips_without_added_tokens(tokenizer) -> None:
    prompt, answer = "07+45=", "052|"
    prompt_ids = tokenizer(prompt).input_ids
    answer_ids = tokenizer(answer).input_ids
    assert len(prompt_ids) == 6 and len(answer_ids) == 4  # no bos/eos added automatically
    assert prompt_ids == [toy.VOCAB.index(c) for c in prompt]
    assert tokenizer.decode(prompt_ids) == prompt
    assert tokenizer.decode(answer_ids) == answer
    assert tokenizer.decode(answer_ids, skip_special_tokens=True) == "052"
    assert tokenizer.eos_token_id == toy.VOCAB.index("|")
    assert tokenizer.pad_token_id == 0
    assert tokenizer.padding_side == "left"
    # Teacher and student folders carry the same tokenizer.
    teacher_tok = AutoTokenizer.from_pretrained(ASSETS / "teacher")
    assert teacher_tok(prompt + answer).input_ids == prompt_ids + answer_ids


def test_splits_are_disjoint_sized_and_deterministic() -> None:
    train, eval_ = toy.problems("train"), toy.problems("eval")
    assert len(train) == 9500 and len(eval_) == 500
    assert not {p for p, _ in train} & {p for p, _ in eval_}
    assert len({p for p, _ in train} | {p for p, _ in eval_}) == 10_000
    assert toy.problems("eval") == eval_ and toy.problems("train") == train
    for prompt, answer in eval_[:50]:
        assert len(prompt) == 6 and len(answer) == 4 and answer.endswith("|")
        assert toy.is_correct(prompt, answer)
    with pytest.raises(ValueError, match="split"):
        toy.problems("test")


def test_is_correct() -> None:
    assert toy.is_correct("07+45=", "052|")
    assert toy.is_correct("07+45=", "052|<pad><pad>")  # anything after the first "|" is ignored
    assert toy.is_correct("07+45=", "052")  # e.g. decoded with skip_special_tokens=True
    assert toy.is_correct("99+99=", "198|")
    for wrong in ["05", "052|", "052", "0520|", "abc", "", "|", "53|", "053 |"]:
        assert not toy.is_correct("07+46=", wrong), wrong
    for wrong in ["52|", "0520|", "05|2", " 052|", "052 |", "<pad>052|", "abc", "\x00"]:
        assert not toy.is_correct("07+45=", wrong), wrong
    with pytest.raises(ValueError, match="prompt_text"):
        toy.is_correct("7+45=", "052|")


def test_configs() -> None:
    teacher, student = toy.teacher_config(), toy.student_config()
    for config, hidden in ((teacher, 128), (student, 64)):
        assert config.vocab_size == 16 and config.tie_word_embeddings
        assert config.hidden_size == hidden and config.num_hidden_layers == 2
        assert config.num_attention_heads == config.num_key_value_heads == 4
        assert config.head_dim == hidden // 4 and config.intermediate_size == 4 * hidden
        assert config.eos_token_id == toy.VOCAB.index("|") and config.pad_token_id == 0


def test_sft_config_validation() -> None:
    with pytest.raises(ValueError, match="lr"):
        toy_assets.SFTConfig(lr=0.0)
    with pytest.raises(ValueError, match="target_accuracy"):
        toy_assets.SFTConfig(target_accuracy=1.5)


def test_committed_teacher_is_accurate(tokenizer) -> None:
    torch.set_num_threads(1)
    teacher = AutoModelForCausalLM.from_pretrained(ASSETS / "teacher")
    assert sum(p.numel() for p in teacher.parameters()) == 527_104
    assert next(teacher.parameters()).dtype == torch.float32
    assert toy.greedy_accuracy(teacher, tokenizer, "eval", limit=100) >= 0.95


def test_committed_student_is_weak_but_not_zero(tokenizer) -> None:
    torch.set_num_threads(1)
    student = AutoModelForCausalLM.from_pretrained(ASSETS / "student")
    accuracy = toy.greedy_accuracy(student, tokenizer, "eval")
    assert 0.05 <= accuracy <= 0.35
    info = json.loads((ASSETS / "build_info.json").read_text())
    assert info["teacher"]["eval_accuracy"] >= 0.97
    assert info["student"]["eval_accuracy"] == pytest.approx(accuracy, abs=0.02)


def test_ensure_assets_does_not_rebuild_existing() -> None:
    assert toy_assets.ensure_assets(ASSETS) == ASSETS
