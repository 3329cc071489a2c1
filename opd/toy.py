"""The embedded toy world: fixed-width 2-digit addition with a tiny teacher and a weak student.

Everything the toy default needs lives here, so a run can start with no downloads:

* the task: ``"07+45="`` (6 tokens) -> ``"052|"`` (4 tokens, ``|`` is end-of-sequence), all 10,000 pairs
  ``a, b in 0..99``, 500 held out by a seeded permutation;
* a 16-token character-level tokenizer (HF ``tokenizers`` WordLevel, wrapped in ``PreTrainedTokenizerFast``);
* two ``Qwen3ForCausalLM`` configs: a teacher (2 x 128, ~0.53 M params) and a student (2 x 64, ~0.13 M);
* ``build_assets``: SFT the teacher to >= 97 % held-out exact match, give the student a brief SFT start
  (~10-25 %: weak, but not at 0, so on-policy samples carry signal), and save both with the tokenizer.

Calibration (NOTES.md in ../shared beside the project): teacher 98-99 % in ~300-350 steps, student ~18 % after ~140 steps.

Build the committed assets with ``python -m opd.toy --out assets/toy [--seed 0]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

logger = logging.getLogger(__name__)

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
    _save_tokenizer(tok, Path(out_dir))
    return tok


def _save_tokenizer(tok: PreTrainedTokenizerFast, out_dir: Path) -> None:
    tok.save_pretrained(str(out_dir))
    # transformers 5 records its class as "TokenizersBackend", a name transformers 4 (which inference engines may
    # pin) cannot resolve; "PreTrainedTokenizerFast" loads the same tokenizer.json under both.
    config_path = out_dir / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text())
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(tokenizer_config, indent=2) + "\n")


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
    # save_pretrained draws a progress bar per (single) shard; mute it for the duration only.
    bar_was_enabled = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        model.to(torch.float32).save_pretrained(str(out_dir), safe_serialization=True)
    finally:
        if bar_was_enabled:
            transformers.utils.logging.enable_progress_bar()
    _save_tokenizer(tokenizer, out_dir)


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
        tokenizer = build_tokenizer(tmp_dir / "teacher")
        generator = torch.Generator().manual_seed(seed)

        torch.manual_seed(seed)  # model init
        teacher = Qwen3ForCausalLM(teacher_config(task.max_positions))
        teacher_result = sft(teacher, tokenizer, teacher_cfg, generator=generator, task=task)
        if teacher_result.eval_accuracy < teacher_cfg.target_accuracy:
            raise RuntimeError(
                f"teacher reached only {teacher_result.eval_accuracy:.3f} held-out accuracy in "
                f"{teacher_result.num_steps} steps (target {teacher_cfg.target_accuracy}); try another seed"
            )
        _save_model(teacher, tokenizer, tmp_dir / "teacher", task)

        torch.manual_seed(seed + 1)  # a different init from the teacher's
        student = Qwen3ForCausalLM(student_config(task.max_positions))
        student_result = sft(student, tokenizer, student_cfg, generator=generator, task=task)
        _save_model(student, tokenizer, tmp_dir / "student", task)

        info = {
            "seed": seed,
            "split_seed": SPLIT_SEED,
            "teacher": {
                "num_params": sum(p.numel() for p in teacher.parameters()),
                "sft": dataclasses.asdict(teacher_cfg),
                **dataclasses.asdict(teacher_result),
            },
            "student": {
                "num_params": sum(p.numel() for p in student.parameters()),
                "sft": dataclasses.asdict(student_cfg),
                **dataclasses.asdict(student_result),
            },
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build the embedded toy teacher/student assets.")
    parser.add_argument("--out", type=Path, required=True, help="output directory, e.g. assets/toy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is robust on a busy machine)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    build_assets(args.out, seed=args.seed)
    info = json.loads((args.out / "build_info.json").read_text())
    logger.info(
        "done in %.1f s: teacher %d steps, eval/accuracy %.3f; student %d steps, eval/accuracy %.3f",
        time.perf_counter() - t0,
        info["teacher"]["num_steps"],
        info["teacher"]["eval_accuracy"],
        info["student"]["num_steps"],
        info["student"]["eval_accuracy"],
    )


if __name__ == "__main__":
    main()
