"""The TRL side of `python -m opd.programs.side_by_side`: TRL's on-policy distillation trainer on the same models and
workload, timed per step. Runs in the side-by-side's own environment (.venv-trl: torch + trl, not a project
dependency), so it imports nothing from this project.

TRL 1.16's `trl.DistillationTrainer` is its on-policy distillation trainer (GKD, Agarwal et al. 2024; the older
`GKDTrainer` moved to `trl.experimental`): per step it samples completions with the student (transformers
`generate`), runs the student backbone with gradients and the teacher backbone without, and computes the
generalised JSD (beta = 1: reverse KL) with its chunked kernel from the two models' hidden states and output
heads, then AdamW. The settings below make its work match this project's step: fp32, no gradient
checkpointing, fixed-length completions (`min_new_tokens`), temperature 1, no top-k / top-p.

    .venv-trl/bin/python opd/programs/trl_peer.py --student S --teacher T --prompts prompts.json --out trl.json ...
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

# Run as a script, its folder (opd/programs/) would come first on sys.path, and a module of it (train.py, cli.py,
# evaluation.py, ...) could shadow a top-level module TRL or its dependencies import.
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]


def _rss(field: str) -> int:
    """VmRSS / VmHWM of this process in bytes (Linux)."""
    with open("/proc/self/status") as status:
        lines = status.read().splitlines()
    for line in lines:
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", required=True)
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--prompts", required=True, help="JSON list of prompt strings (one step's worth or more)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--prompts-per-step", type=int, required=True)
    parser.add_argument("--response-tokens", type=int, required=True)
    parser.add_argument("--warmup-steps", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def _distillation_config(args):
    """TRL's settings for this project's step: fp32, reverse KL, fixed-length completions, temperature 1."""
    import trl

    return trl.DistillationConfig(
        output_dir=os.path.join(os.path.dirname(os.path.abspath(args.out)), "trl_output"),
        per_device_train_batch_size=args.prompts_per_step, gradient_accumulation_steps=1,
        max_steps=args.warmup_steps + args.steps,
        learning_rate=args.lr, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0,
        beta=1.0,  # reverse KL, as loss.kind=rkl
        temperature=1.0, top_k=0, top_p=1.0, max_completion_length=args.response_tokens,
        generation_kwargs={"min_new_tokens": args.response_tokens},  # fixed length, as rollout.ignore_eos
        bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=True,
        logging_steps=10_000, save_strategy="no", report_to="none", dataloader_num_workers=0,
        disable_tqdm=True, seed=args.seed)


def _timer(warmup_steps: int, steps: list[dict]):
    """A TrainerCallback that appends each timed step to `steps`."""
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        """Each step's wall time (generation, both forwards, loss, backward, optimizer), the generation's
        share, and the resident-memory peak over the timed steps (reset after the warm-up)."""

        def on_step_begin(self, _args, state, control, **kwargs):
            if state.global_step == warmup_steps:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # VmHWM := current RSS
                self.rss_at_start = _rss("VmRSS")
            self.generate_s = 0.0
            self.t0 = time.perf_counter()

        def on_step_end(self, _args, state, control, **kwargs):
            if state.global_step > warmup_steps:
                steps.append({"step": state.global_step, "total": time.perf_counter() - self.t0,
                              "rollout": self.generate_s})

    return Timer()


def _time_generation(trainer, timer, response_tokens: int) -> None:
    """Wrap the trainer's generation so that its time counts as the step's rollout, and check the lengths."""
    generate = trainer._generate_single_turn

    def timed_generate(*a, **kw):
        t0 = time.perf_counter()
        completions = generate(*a, **kw)
        timer.generate_s += time.perf_counter() - t0
        lengths = {len(c) for c in completions}
        if lengths != {response_tokens}:
            raise RuntimeError(f"completion lengths {sorted(lengths)}, expected {response_tokens} for all")
        return completions

    trainer._generate_single_turn = timed_generate


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.utils.logging.set_verbosity_error()
    tokenizer = AutoTokenizer.from_pretrained(args.student, padding_side="left")
    student = AutoModelForCausalLM.from_pretrained(args.student, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(args.teacher, dtype=torch.float32)
    with open(args.prompts) as f:
        prompts = json.load(f)
    dataset = Dataset.from_dict({"prompt": prompts})

    steps: list[dict] = []
    timer = _timer(args.warmup_steps, steps)
    trainer = trl.DistillationTrainer(model=student, teacher_model=teacher, args=_distillation_config(args),
                                      train_dataset=dataset, processing_class=tokenizer, callbacks=[timer])
    _time_generation(trainer, timer, args.response_tokens)
    trainer.train()
    result = {"trl": trl.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
              "threads": args.threads, "steps": steps, "peak_rss_bytes": _rss("VmHWM"),
              "rss_at_start_bytes": timer.rss_at_start}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
