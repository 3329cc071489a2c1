"""The toy's teacher and student, trained: supervised fine-tuning on gold answers, saved as the assets.

``build_assets`` SFTs the teacher to >= 97 % held-out exact match, gives the student a brief SFT start (~10-25 %:
weak, but not at 0, so on-policy samples carry signal), and saves both with the tokenizer (the task, tokenizer
and model shapes are opd/toy.py's); ``ensure_assets`` builds them when missing.

Calibration (NOTES.md in ../shared beside the project): teacher 98-99 % in ~300-350 steps, student ~18 % after
~140 steps.

Build the committed assets with ``python -m opd.programs.build_toy --out assets/toy [--seed 0]``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import PreTrainedTokenizerFast, Qwen3ForCausalLM

from opd.models import save_model
from opd.toy import (ADDITION, SPLIT_SEED, Task, build_tokenizer, generation_config, greedy_accuracy, student_config,
                     teacher_config)

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------------------
# Supervised fine-tuning (builds the assets)
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class SFTConfig:
    """Supervised fine-tuning on gold answers; loss only on the 4 answer tokens.

    Training stops at the first evaluation (every ``eval_every`` steps, from ``min_steps`` on) whose held-out
    greedy accuracy is >= ``target_accuracy``, or at ``max_steps``.
    """

    lr: float = 3e-3
    # beta2 0.98 rather than 0.999: to 97 % in 350/250/300 teacher steps for seeds 0/1/2, against 500/300/250.
    adam_betas: tuple[float, float] = (0.9, 0.98)
    batch_size: int = 256
    grad_clip: float = 1.0
    max_steps: int = 800
    min_steps: int = 50
    eval_every: int = 50
    target_accuracy: float = 0.97

    def __post_init__(self) -> None:
        for name in ("lr", "batch_size", "grad_clip", "max_steps", "eval_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"SFTConfig.{name}={getattr(self, name)} must be > 0")
        if not 0 < self.min_steps <= self.max_steps:
            raise ValueError(f"SFTConfig.min_steps={self.min_steps} must be in [1, max_steps={self.max_steps}]")
        if not all(0.0 <= beta < 1.0 for beta in self.adam_betas):
            raise ValueError(f"SFTConfig.adam_betas={self.adam_betas} must lie in [0, 1)")
        if not 0.0 <= self.target_accuracy <= 1.0:
            raise ValueError(f"SFTConfig.target_accuracy={self.target_accuracy} must be in [0, 1]")


def teacher_sft() -> SFTConfig:
    """NOTES.md: 98-99 % held-out exact match in ~300-350 steps."""
    return SFTConfig(max_steps=1000, min_steps=50, eval_every=50, target_accuracy=0.97)


def student_sft() -> SFTConfig:
    """Stop as soon as the student gets >= 15 % right: weak, but on-policy samples already contain hits.

    Checked every 10 steps because accuracy rises steeply here (NOTES.md: ~18 % after ~140 steps with beta2
    0.999; with beta2 0.98 the default seed passes 15 % after ~70 steps).
    """
    return SFTConfig(max_steps=300, min_steps=40, eval_every=10, target_accuracy=0.15)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SFTResult:
    num_steps: int
    eval_accuracy: float
    final_loss: float
    wall_s: float


def _encode_split(tokenizer: PreTrainedTokenizerFast, split: str, task: Task = ADDITION) -> torch.Tensor:
    """All ``prompt + answer`` sequences of a split: ``[num_problems, prompt + answer]`` int64 (fixed width, no
    padding; 10 for the addition)."""
    texts = [p + a for p, a in task.problems(split)]
    ids_NT = torch.tensor(tokenizer(texts).input_ids, dtype=torch.long)
    assert ids_NT.shape == (len(texts), task.prompt_tokens + task.answer_tokens)
    return ids_NT


def sft(
    model: Qwen3ForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    cfg: SFTConfig,
    *,
    generator: torch.Generator,
    task: Task = ADDITION,
) -> SFTResult:
    """Train ``model`` in place on the train split; return steps used and the last held-out accuracy."""
    t0 = time.perf_counter()
    ids_NT = _encode_split(tokenizer, "train", task)
    num_train = ids_NT.shape[0]
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.adam_betas)
    model.train()
    perm: list[int] = []
    loss_value = float("nan")
    accuracy = 0.0
    step = 0
    while step < cfg.max_steps:
        # Epoch-wise shuffling from the seeded generator; the tail that does not fill a batch is dropped.
        if len(perm) < cfg.batch_size:
            perm = torch.randperm(num_train, generator=generator).tolist()
        batch_idx, perm = perm[: cfg.batch_size], perm[cfg.batch_size :]
        batch_BT = ids_NT[batch_idx]
        # Position t predicts token t+1; the answer tokens sit at 6..9, so logits at 5..8 are scored and the
        # last token ("|") never needs to be fed in.
        logits_BAV = model(input_ids=batch_BT[:, :-1]).logits[:, task.prompt_tokens - 1 :]
        targets_BA = batch_BT[:, task.prompt_tokens:]
        loss = torch.nn.functional.cross_entropy(logits_BAV.reshape(-1, logits_BAV.shape[-1]), targets_BA.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        step += 1
        if step >= cfg.min_steps and (step % cfg.eval_every == 0 or step == cfg.max_steps):
            loss_value = loss.item()  # sync point, only at evaluation steps
            accuracy = greedy_accuracy(model, tokenizer, "eval", task=task)
            logger.info("sft step %d loss %.4f eval/accuracy %.3f", step, loss_value, accuracy)
            if accuracy >= cfg.target_accuracy:
                break
    model.eval()
    return SFTResult(num_steps=step, eval_accuracy=accuracy, final_loss=loss_value, wall_s=time.perf_counter() - t0)


def _save_model(model: Qwen3ForCausalLM, tokenizer: PreTrainedTokenizerFast, out_dir: Path,
                task: Task = ADDITION) -> None:
    model.generation_config = generation_config(task)
    save_model(model, tokenizer, out_dir)


def _train_pair(out_dir: Path, seed: int, task: Task, teacher_cfg: SFTConfig, student_cfg: SFTConfig) -> dict:
    """Tokenizer, teacher and student trained and saved under ``out_dir``; returns their build info."""
    tokenizer = build_tokenizer(out_dir / "teacher")
    generator = torch.Generator().manual_seed(seed)

    torch.manual_seed(seed)  # model init
    teacher = Qwen3ForCausalLM(teacher_config(task.max_positions))
    teacher_result = sft(teacher, tokenizer, teacher_cfg, generator=generator, task=task)
    if teacher_result.eval_accuracy < teacher_cfg.target_accuracy:
        raise RuntimeError(
            f"teacher reached only {teacher_result.eval_accuracy:.3f} held-out accuracy in "
            f"{teacher_result.num_steps} steps (target {teacher_cfg.target_accuracy}); try another seed"
        )
    _save_model(teacher, tokenizer, out_dir / "teacher", task)

    torch.manual_seed(seed + 1)  # a different init from the teacher's
    student = Qwen3ForCausalLM(student_config(task.max_positions))
    student_result = sft(student, tokenizer, student_cfg, generator=generator, task=task)
    _save_model(student, tokenizer, out_dir / "student", task)
    return {"teacher": _side_info(teacher, teacher_cfg, teacher_result),
            "student": _side_info(student, student_cfg, student_result)}


def _side_info(model: Qwen3ForCausalLM, cfg: SFTConfig, result: SFTResult) -> dict:
    return {"num_params": sum(p.numel() for p in model.parameters()), "sft": dataclasses.asdict(cfg),
            **dataclasses.asdict(result)}


def build_assets(out_dir: str | os.PathLike[str], seed: int = 0, *, task: Task = ADDITION,
                 teacher: SFTConfig | None = None, student: SFTConfig | None = None) -> None:
    """Build tokenizer, teacher and student into ``out_dir`` (replacing it), atomically.

    Layout: ``teacher/`` and ``student/`` (float32 safetensors + tokenizer each) and ``build_info.json``.
    Everything is written to a temporary sibling directory that is renamed into place only at the end, so a
    crash never leaves half-written assets behind. Reruns with the same seed on the same machine are identical.
    """
    t0 = time.perf_counter()
    teacher_cfg, student_cfg = teacher or teacher_sft(), student or student_sft()
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    if tmp_dir.exists():
        shutil.rmtree(tmp_dir)
    tmp_dir.mkdir()
    try:
        sides = _train_pair(tmp_dir, seed, task, teacher_cfg, student_cfg)
        info = {
            "seed": seed,
            "split_seed": SPLIT_SEED,
            **sides,
            "wall_s": round(time.perf_counter() - t0, 2),
            "num_threads": torch.get_num_threads(),
            "torch_version": torch.__version__,
            "transformers_version": transformers.__version__,
        }
        (tmp_dir / "build_info.json").write_text(json.dumps(info, indent=2) + "\n")

        # Swap into place: move any old assets aside first (rename cannot replace a non-empty directory).
        old_dir = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        if out_dir.exists():
            out_dir.rename(old_dir)
        tmp_dir.rename(out_dir)
        if old_dir.exists():
            shutil.rmtree(old_dir)
    finally:
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir)


def ensure_assets(out_dir: str | os.PathLike[str], *, task: Task = ADDITION, teacher: SFTConfig | None = None,
                  student: SFTConfig | None = None, takes: str = "about a minute") -> Path:
    """Return ``out_dir`` once it holds ``teacher/`` and ``student/``, building them first if missing (`task`,
    with these SFT settings)."""
    out_dir = Path(out_dir)
    if (out_dir / "teacher" / "config.json").exists() and (out_dir / "student" / "config.json").exists():
        return out_dir
    # print, not log: the driver does not configure logging, and a silent minute looks like a hang.
    print(f"{task.name} assets missing under {out_dir}: building them ({takes} on a CPU)", file=sys.stderr,
          flush=True)
    t0 = time.perf_counter()
    build_assets(out_dir, task=task, teacher=teacher, student=student)
    print(f"built {task.name} assets under {out_dir} in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return out_dir
