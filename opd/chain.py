"""The embedded harder task: running sums, built to expose compounding errors.

``"7+5+9+3+8+6="`` (12 tokens) -> ``"1221243238|"``: after each term from the second on, the sum so far as two
digits (12, 21, 24, 32, 38), then ``|`` (11 tokens). Each sum is the previous one plus a digit, so a student that
slips early writes every later sum wrong from its own mistake: a sequence-level teacher's samples never show it
that state, its own samples do. Same 16-token vocabulary and model shapes as the addition (opd/toy.py); 20,000
training and 500 held-out problems drawn once with a fixed seed from the 10^6.

Build the assets with ``python -m opd.programs.build_chain --out assets/chain`` (the study builds them when
missing).
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from opd import toy, toy_assets

TERMS = 6
NUM_PROMPT_TOKENS = 2 * TERMS  # "7+5+9+3+8+6="
NUM_ANSWER_TOKENS = 2 * (TERMS - 1) + 1  # "1221243238|"
NUM_TRAIN, NUM_EVAL = 20_000, 500
SPLIT_SEED = 4321


def _answer(digits: tuple[int, ...]) -> str:
    sums = [sum(digits[: k + 1]) for k in range(1, len(digits))]
    return "".join(f"{s:02d}" for s in sums) + toy.EOS


@functools.cache
def _splits() -> dict[str, list[tuple[int, ...]]]:
    generator = torch.Generator().manual_seed(SPLIT_SEED)
    seen: dict[tuple[int, ...], None] = {}
    while len(seen) < NUM_TRAIN + NUM_EVAL:
        for row in torch.randint(0, 10, (4096, TERMS), generator=generator).tolist():
            seen.setdefault(tuple(row), None)
    drawn = list(seen)[: NUM_TRAIN + NUM_EVAL]
    return {"eval": drawn[:NUM_EVAL], "train": drawn[NUM_EVAL:]}


def problems(split: str) -> list[tuple[str, str]]:
    """``(prompt_text, answer_text)`` pairs of a split (the answer ends with ``|``); deterministic, disjoint."""
    if split not in toy.SPLITS:
        raise ValueError(f"split={split!r} is not one of {toy.SPLITS}")
    return [("+".join(map(str, d)) + "=", _answer(d)) for d in _splits()[split]]


def is_correct(prompt_text: str, response_text: str) -> bool:
    """Every running sum right: the response up to the first ``|`` equals the answer's digits."""
    terms = prompt_text.rstrip("=").split("+")
    if len(terms) != TERMS or not all(len(t) == 1 and t.isdigit() for t in terms):
        raise ValueError(f"prompt_text={prompt_text!r} is not {TERMS} digits joined by '+' and ending with '='")
    return response_text.split(toy.EOS, 1)[0] == _answer(tuple(map(int, terms)))[:-1]


def correct_prefix(prompt_text: str, response_text: str) -> int:
    """How many of the running sums are right before the first wrong one (0 to TERMS - 1)."""
    want, got = _answer(tuple(map(int, prompt_text.rstrip("=").split("+"))))[:-1], response_text.split(toy.EOS, 1)[0]
    k = 0
    while k < TERMS - 1 and got[2 * k: 2 * k + 2] == want[2 * k: 2 * k + 2]:
        k += 1
    return k


# 64 positions: a run's prompt (12) + the hybrid's or SFT's gold prefix (up to 10) + rollout.max_new_tokens (12)
TASK = toy.Task("toy_chain", problems, is_correct, NUM_PROMPT_TOKENS, NUM_ANSWER_TOKENS, max_positions=64)


def teacher_sft() -> toy_assets.SFTConfig:
    return toy_assets.SFTConfig(max_steps=3000, min_steps=100, eval_every=100, target_accuracy=0.95)


def student_sft() -> toy_assets.SFTConfig:
    """Weak, but not at 0: the student stops at the first check with >= 5 % of the chains exactly right."""
    return toy_assets.SFTConfig(max_steps=1500, min_steps=20, eval_every=20, target_accuracy=0.05)


def build_assets(out_dir: str | Path, seed: int = 0) -> None:
    toy_assets.build_assets(out_dir, seed, task=TASK, teacher=teacher_sft(), student=student_sft())


def ensure_assets(out_dir: str | Path) -> Path:
    """``out_dir`` once it holds ``teacher/`` and ``student/``, building them first if missing."""
    return toy_assets.ensure_assets(out_dir, task=TASK, teacher=teacher_sft(), student=student_sft(),
                                    takes="~2 minutes")
