"""Build the SmolLM2 teacher/student assets (opd/smollm2.py) and print their sanity numbers.

    python -m opd.programs.build_smollm2 --cache assets/smollm2 [--student-layers 6] [--threads N]

It prints each model's size, both models' greedy answers to three chat prompts, and the per-position reverse KL
of the student to the teacher on the teacher's answers (the teacher against itself is the canary: ~0).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch
from transformers import PreTrainedModel

from opd.compatibility import check_compatible
from opd.config import resolve_path
from opd.models import load_model, load_tokenizer
from opd.smollm2 import smollm2_assets

QUESTIONS = ("What is 2+3?", "What is the capital of France?", "Name a primary colour.")


@torch.no_grad()
def _reverse_kl(student: PreTrainedModel, teacher: PreTrainedModel, ids: torch.Tensor, valid_vocab: int) -> float:
    """Mean over positions of KL(p_S || p_T) on one unpadded sequence ``ids`` ``[1, T]``, padded rows dropped."""
    logp_s = torch.log_softmax(student(ids).logits[0, :, :valid_vocab].float(), dim=-1)
    logp_t = torch.log_softmax(teacher(ids).logits[0, :, :valid_vocab].float(), dim=-1)
    return float((logp_s.exp() * (logp_s - logp_t)).sum(-1).mean())


def _load(teacher_dir: Path, student_dir: Path) -> dict[str, PreTrainedModel]:
    """Both models, each with its size printed."""
    models = {}
    for side, folder in (("teacher", teacher_dir), ("student", student_dir)):
        models[side] = load_model(str(folder))
        num_bytes = sum(p.stat().st_size for p in folder.iterdir())
        print(f"{side}: {models[side].config.num_hidden_layers} layers, "
              f"{sum(p.numel() for p in models[side].parameters()) / 1e6:.1f} M params, {num_bytes / 2**20:.0f} MiB")
    return models


def _greedy_answers(models: dict[str, PreTrainedModel], tokenizer) -> list[torch.Tensor]:
    """Print both models' greedy answers to QUESTIONS; return the teacher's sequences (prompt + answer)."""
    sequences = []
    for question in QUESTIONS:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                               return_tensors="pt", return_dict=True)
        for side in ("teacher", "student"):
            out = models[side].generate(**prompt, max_new_tokens=24, do_sample=False)
            answer = tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
            print(f"{side} greedy: {question!r} -> {answer!r}")
            if side == "teacher":
                sequences.append(out)
    return sequences


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build the SmolLM2 teacher/student assets and check them.")
    parser.add_argument("--cache", type=Path, default=resolve_path("assets/smollm2"))
    parser.add_argument("--student-layers", type=int, default=6)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    teacher_dir, student_dir = smollm2_assets(args.cache, student_layers=args.student_layers)
    print(f"assets ready in {time.perf_counter() - t0:.1f} s under {args.cache}")
    tokenizer = load_tokenizer(str(teacher_dir))
    models = _load(teacher_dir, student_dir)
    valid_vocab = check_compatible(load_tokenizer(str(student_dir)), tokenizer, models["student"].config,
                                   models["teacher"].config)
    sequences = _greedy_answers(models, tokenizer)
    kls = [_reverse_kl(models["student"], models["teacher"], ids, valid_vocab) for ids in sequences]
    self_kl = _reverse_kl(models["teacher"], models["teacher"], sequences[0], valid_vocab)  # canary: must be ~0
    print(f"valid vocab {valid_vocab}; KL(student || teacher) per position on teacher answers: "
          f"{', '.join(f'{kl:.3f}' for kl in kls)}; teacher vs itself {self_kl:.2e}")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    main()
