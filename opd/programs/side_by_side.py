"""This project next to TRL's on-policy distillation trainer, on the same CPU workload, in one command:

    python -m opd.programs.side_by_side              # creates .venv-trl (torch 2.13 + trl 1.16) on first use

1. `.venv-trl/`: TRL in its own environment (not a dependency of this project); reused once it exists.
2. Two Qwen3 models built from configs with seeded random weights, saved once (student 2 x 256, teacher
   4 x 512, 32768-row vocabulary, tied student embeddings), with a synthetic tokenizer: both systems load the
   same files.
3. The same workload for both: `--prompts` prompts of `--prompt-tokens` tokens, one response each of exactly
   `--response-tokens` tokens (end-of-sequence ignored), reverse KL over the full vocabulary (TRL: beta = 1),
   fp32, AdamW, `--threads` torch threads per process, `--warmup-steps` untimed steps then `--steps` timed.
4. TRL's `DistillationTrainer` (opd/programs/trl_peer.py, in .venv-trl) and `driver.py --bench` (cpu mode, Ray actors),
   one after the other; then the step-time and peak-memory ratios, printed and written to
   runs/side_by_side/<name>/side_by_side.json.

Peak memory is the resident set size: TRL's one process against the sum of this project's three actors (Ray's
own daemons left out); "during steps" is the peak over the timed steps minus the resident size when they
started, i.e. what the step itself allocates (logits, activations, optimizer state on first use).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

from opd.config import PROJECT_ROOT

TRL_ENV = PROJECT_ROOT / ".venv-trl"
TRL_PINS = ("torch==2.13.0", "trl==1.16.0")  # torch pinned: an unpinned one pulls a multi-GB CUDA build
STUDENT = {"hidden_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "head_dim": 64, "intermediate_size": 768, "tie_word_embeddings": True}
TEACHER = {"hidden_size": 512, "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 4,
           "head_dim": 64, "intermediate_size": 1536, "tie_word_embeddings": False}


def ensure_trl_env(env: Path = TRL_ENV) -> Path:
    """The python of `env`, with TRL_PINS installed (created on first use)."""
    python = env / "bin" / "python"
    probe = [str(python), "-c", "import trl, torch; print(trl.__version__, torch.__version__)"]
    found = subprocess.run(probe, capture_output=True, text=True, check=False).stdout if python.exists() else ""
    if found.split()[:1] == ["1.16.0"]:
        return python
    print(f"creating {env} ({' '.join(TRL_PINS)}), a few minutes the first time", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *TRL_PINS], check=True)
    return python


def build_models(out_dir: Path, vocab_size: int, seed: int = 0) -> tuple[Path, Path]:
    """`out_dir/student` and `out_dir/teacher`: Qwen3 models with seeded random weights, saved as safetensors
    with the synthetic tokenizer (reused when present)."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config

    from opd.shapes import save_synthetic_tokenizer

    folders = []
    for side, shape in (("student", STUDENT), ("teacher", TEACHER)):
        folder = out_dir / f"{side}-v{vocab_size}"
        if not (folder / "model.safetensors").is_file():
            config = Qwen3Config(vocab_size=vocab_size, max_position_embeddings=8192,
                                 rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                                 bos_token_id=None, eos_token_id=1, pad_token_id=0, **shape)
            torch.manual_seed(seed)
            AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(str(folder))
            save_synthetic_tokenizer(folder, vocab_size)
        folders.append(folder)
    return folders[0], folders[1]


def run_trl(python: Path, student: Path, teacher: Path, out_dir: Path, args) -> dict:
    import torch

    generator = torch.Generator().manual_seed(args.seed)
    num_prompts = args.prompts * (args.warmup_steps + args.steps)
    ids = torch.randint(3, args.vocab, (num_prompts, args.prompt_tokens), generator=generator).tolist()
    (out_dir / "prompts.json").write_text(json.dumps([" ".join(f"t{i}" for i in row) for row in ids]))
    out = out_dir / "trl.json"
    subprocess.run([str(python), str(PROJECT_ROOT / "opd" / "programs" / "trl_peer.py"), "--student", str(student),
                    "--teacher", str(teacher), "--prompts", str(out_dir / "prompts.json"), "--out", str(out),
                    "--prompts-per-step", str(args.prompts), "--response-tokens", str(args.response_tokens),
                    "--warmup-steps", str(args.warmup_steps), "--steps", str(args.steps),
                    "--threads", str(args.threads), "--seed", str(args.seed)], check=True,
                   env={**os.environ, "PYTHONPATH": ""})
    return json.loads(out.read_text())


def run_opd(student: Path, teacher: Path, out_dir: Path, args) -> dict:
    settings = {"model.student": student, "model.teacher": teacher, "model.dtype": "float32", "run.mode": "cpu",
                "run.out_dir": out_dir, "run.name": "opd", "run.threads_per_actor": args.threads,
                "run.progress": "false", "train.prompts_per_step": args.prompts, "train.seed": args.seed,
                "rollout.num_samples": 1, "rollout.max_new_tokens": args.response_tokens,
                "rollout.temperature": 1.0, "rollout.top_k": 0, "rollout.top_p": 1.0, "loss.kind": "rkl",
                "loss.temperature": 1.0, "learner.lr": 1e-5, "learner.lr_schedule": "constant",
                "learner.max_grad_norm": 1.0, "bench.prompt_tokens": args.prompt_tokens,
                "bench.warmup_steps": args.warmup_steps, "bench.steps": args.steps,
                "rollout.compile": str(args.compile).lower()}
    command = [sys.executable, str(PROJECT_ROOT / "driver.py"), "--bench"]
    for key, value in settings.items():
        command += ["--set", f"{key}={value}"]
    subprocess.run(command, check=True, cwd=PROJECT_ROOT)
    return json.loads((out_dir / "opd" / "bench.json").read_text())


def compare(opd: dict, trl: dict) -> dict:
    """Means over the timed steps and the ratios opd / TRL (below 1: this project is faster / smaller)."""
    def mean(values):
        return sum(values) / len(values)

    opd_step = opd["step"]["time_s"]["mean"]
    opd_rollout = opd["phases"]["rollout"]["time_s"]["mean"]
    trl_step = mean([s["total"] for s in trl["steps"]])
    trl_rollout = mean([s["rollout"] for s in trl["steps"]])
    opd_peak = sum(e["peak_rss_bytes"] for entries in opd["memory"].values() for e in entries)
    opd_growth = sum(e["peak_rss_bytes"] - e["rss_at_start_bytes"] for entries in opd["memory"].values()
                     for e in entries)
    trl_growth = trl["peak_rss_bytes"] - trl["rss_at_start_bytes"]
    rows = {
        "step_s": (opd_step, trl_step),
        "rollout_s": (opd_rollout, trl_rollout),
        "score_train_sync_s": (opd_step - opd_rollout, trl_step - trl_rollout),
        "peak_rss_bytes": (opd_peak, trl["peak_rss_bytes"]),
        "rss_growth_during_steps_bytes": (opd_growth, trl_growth),
    }
    return {key: {"opd": a, "trl": b, "ratio_opd_over_trl": a / b if b else None} for key, (a, b) in rows.items()}


def format_comparison(result: dict) -> str:
    w = result["workload"]
    lines = [(f"side by side on {w['machine']}: student {STUDENT['num_hidden_layers']} x {STUDENT['hidden_size']}, "
              f"teacher {TEACHER['num_hidden_layers']} x {TEACHER['hidden_size']}, vocabulary {w['vocab']}, "
              f"{w['prompts']} prompts x {w['response_tokens']} response tokens, reverse KL, fp32, "
              f"{w['threads']} thread(s), {w['steps']} timed steps"),
             f"{'':34}{'opd':>12}{'TRL ' + result['trl_version']:>14}{'opd / TRL':>12}"]
    for key, label, scale, unit in (("step_s", "step time", 1, "s"), ("rollout_s", "  rollout (generation)", 1, "s"),
                                    ("score_train_sync_s", "  the rest of the step", 1, "s"),
                                    ("peak_rss_bytes", "peak RSS", 1 << 30, "GiB"),
                                    ("rss_growth_during_steps_bytes", "  of which during the steps", 1 << 30,
                                     "GiB")):
        row = result["comparison"][key]
        lines.append(f"{label + ' (' + unit + ')':<34}{row['opd'] / scale:>12.2f}{row['trl'] / scale:>14.2f}"
                     f"{row['ratio_opd_over_trl']:>12.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=2, help="prompts per step (one response each)")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--response-tokens", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--warmup-steps", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per process, both systems (one: robust on a busy 2-core machine)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="this project's rollout.compile (the decode steps through torch.compile; compiled in "
                             "the warm-up step). --no-compile: the default eager loop")
    parser.add_argument("--out-dir", type=Path, default=PROJECT_ROOT / "runs" / "side_by_side")
    parser.add_argument("--name", default="")
    args = parser.parse_args(argv)

    python = ensure_trl_env()
    student, teacher = build_models(args.out_dir / "models", args.vocab, args.seed)
    out_dir = args.out_dir / (args.name or datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    out_dir.mkdir(parents=True, exist_ok=False)
    print("== TRL DistillationTrainer", flush=True)
    trl = run_trl(python, student, teacher, out_dir, args)
    print("== opd driver.py --bench", flush=True)
    opd = run_opd(student, teacher, out_dir, args)
    result = {"created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join(["python -m opd.programs.side_by_side", *(argv if argv is not None else sys.argv[1:])]),
              "workload": {"prompts": args.prompts, "prompt_tokens": args.prompt_tokens,
                           "response_tokens": args.response_tokens, "vocab": args.vocab, "threads": args.threads,
                           "warmup_steps": args.warmup_steps, "steps": args.steps, "opd_compile": args.compile,
                           "student": STUDENT, "teacher": TEACHER, "machine": f"{os.cpu_count()}-core CPU"},
              "trl_version": trl["trl"], "comparison": compare(opd, trl), "trl": trl, "opd_bench": opd}
    (out_dir / "side_by_side.json").write_text(json.dumps(result, indent=2) + "\n")
    print("\n" + format_comparison(result))
    print(f"\n{out_dir / 'side_by_side.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
