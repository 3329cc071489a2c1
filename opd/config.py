"""One typed config tree: a frozen dataclass per section, validated on construction.

A bad value raises `ConfigError` (a `ValueError`) naming the field and the fix, before Ray or any model starts.
The presets are opd/presets.py; `--set a.b=value` and a saved config.json are read by opd/overrides.py.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
LOSSES = ("fkl", "rkl", "jsd", "sampled_rkl")
MODES = ("cpu", "colocated", "split")
ENGINES = ("hf", "sglang")
SAMPLERS = ("auto", "torch", "flashinfer", "generate")
OFF_POLICY_SOURCES = ("teacher", "dataset")
LR_SCHEDULES = ("constant", "linear", "cosine")
DTYPES = ("float32", "bfloat16", "float16")
TRACKERS = ("tensorboard", "wandb", "mlflow")


class ConfigError(ValueError):
    """A user or config error: one line that names the problem and the fix."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    # a local Hugging Face folder (relative paths resolve against the project root) or a hub id
    student: str
    teacher: str
    dtype: str = "float32"  # weights of the rollout engine and teacher; the learner keeps fp32 master weights
    attn_implementation: str = ""  # "" = transformers' default (sdpa), or eager / flash_attention_2 / ...

    def __post_init__(self):
        _require(bool(self.student), "model.student is empty: give a Hugging Face model folder or hub id")
        _require(bool(self.teacher), "model.teacher is empty: give a Hugging Face model folder or hub id")
        _require(self.dtype in DTYPES, f"model.dtype={self.dtype!r} is unknown: use one of {', '.join(DTYPES)}")


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    # the embedded task (opd/toy.py; toy_chain: opd/chain.py's running sums), or a .jsonl / .parquet file / folder
    source: str = "toy_addition"
    num_eval_prompts: int = 256  # held-out prompts used by evaluation
    max_prompt_tokens: int = 1024  # longer prompts are skipped and counted
    chat_template: bool = True  # render prompts with the student's chat template (datasets only)
    system_prompt: str = ""
    teacher_template: str = "student"  # "teacher": the teacher's prompt uses the teacher's own chat template
    teacher_system_prompt: str = ""  # the teacher's own system prompt ("" = the student's)
    enable_thinking: bool | None = None  # Qwen3 thinking mode on / off (None: the template's default)
    # Hybrid SFT + on-policy (Lite-OPD): the first gold_prefix_max_tokens tokens of this field's text (answer: the
    # gold answer) open the assistant turn, the student continues them; loss.sft_weight x cross-entropy on the
    # gold tokens, the divergence on the continuation. "": off. 0 tokens: the whole gold text.
    gold_prefix_field: str = ""
    gold_prefix_max_tokens: int = 0

    def __post_init__(self):
        _require(self.gold_prefix_max_tokens >= 0,
                 f"data.gold_prefix_max_tokens={self.gold_prefix_max_tokens} must be >= 0 (0: the whole gold text)")
        _require(bool(self.source), "data.source is empty: use toy_addition or a .jsonl / .parquet path")
        _require(self.num_eval_prompts > 0, f"data.num_eval_prompts={self.num_eval_prompts} must be > 0")
        _require(self.max_prompt_tokens > 0, f"data.max_prompt_tokens={self.max_prompt_tokens} must be > 0")
        _require(self.teacher_template in ("student", "teacher"),
                 f"data.teacher_template={self.teacher_template!r} is unknown: use student or teacher")


@dataclass(frozen=True, kw_only=True)
class RolloutConfig:
    engine: str = "hf"
    num_samples: int = 1  # responses sampled per prompt
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    max_new_tokens: int = 8
    # hf engine: KV-cache tokens of one decoding wave, rows x (longest prompt + max_new_tokens): the batch is decoded
    # in waves under it, and so are the teacher's and the student's greedy answers to the held-out prompts
    # (0: all rows at once). sglang sizes its own KV pool (rollout.mem_fraction).
    max_batch_tokens: int = 0
    ignore_eos: bool = False  # every response runs to max_new_tokens (benchmarks: fixed-length responses)
    # hf engine: its own KV-cached decode loop sampling with torch, or on a GPU with FlashInfer's kernels (auto:
    # FlashInfer on a GPU where it imports and has its kernels: nvcc or flashinfer-jit-cache; else torch);
    # generate: transformers' `generate`, the reference
    sampler: str = "auto"
    # hf engine on the CPU (run.mode=cpu): the decode steps through torch.compile (the decoder, and the output head
    # for up to 4 rows where that is timed faster). Needs a C++ compiler; compiles once per process (~10-30 s here; dynamic in the context
    # length and batch), then ~30 % off a decode step: for long rollouts (benchmarks, the side by side).
    compile: bool = False
    mem_fraction: float = 0.4  # sglang: GPU memory fraction for its weights and KV cache (mem_fraction_static)
    # The fraction of each step's prompts the student answers (1: on-policy distillation). The others are answered
    # by off_policy_source: "teacher" (the teacher samples, with the settings above) or "dataset" (the gold
    # answers); the loss is the same on every response. 0 with the teacher: sequence-level KD.
    student_fraction: float = 1.0
    off_policy_source: str = "teacher"

    def __post_init__(self):
        _require(0 <= self.student_fraction <= 1,
                 f"rollout.student_fraction={self.student_fraction} must be in [0, 1] (1: on-policy, 0: off-policy)")
        _require(self.off_policy_source in OFF_POLICY_SOURCES, f"rollout.off_policy_source="
                 f"{self.off_policy_source!r} is unknown: use one of {OFF_POLICY_SOURCES}")
        _require(self.engine in ENGINES, f"rollout.engine={self.engine!r} is unknown: use one of {ENGINES}")
        _require(self.sampler in SAMPLERS, f"rollout.sampler={self.sampler!r} is unknown: use one of {SAMPLERS}")
        _require(not self.compile or (self.engine == "hf" and self.sampler != "generate"),
                 f"rollout.compile=true compiles the hf engine's decode loop: use rollout.engine=hf with "
                 f"rollout.sampler auto or torch (not engine={self.engine}, sampler={self.sampler})")
        _require(0 < self.mem_fraction < 1, f"rollout.mem_fraction={self.mem_fraction} must be in (0, 1)")
        _require(self.num_samples > 0, f"rollout.num_samples={self.num_samples} must be > 0")
        _require(self.max_batch_tokens >= 0, f"rollout.max_batch_tokens={self.max_batch_tokens} must be >= 0 (0: "
                 "every row of a batch at once)")
        _require(self.temperature > 0, f"rollout.temperature={self.temperature} must be > 0")
        _require(0 < self.top_p <= 1, f"rollout.top_p={self.top_p} must be in (0, 1]")
        _require(self.top_k >= 0, f"rollout.top_k={self.top_k} must be >= 0 (0 turns it off)")
        _require(self.max_new_tokens > 0, f"rollout.max_new_tokens={self.max_new_tokens} must be > 0")


@dataclass(frozen=True, kw_only=True)
class LossConfig:
    # fkl = KL(p_T||p_S), rkl = KL(p_S||p_T), jsd = generalised JSD(beta), all over the full vocabulary;
    # sampled_rkl = the sampled-token estimator (teacher minus student log-prob of the sampled token as a
    # detached advantage, PPO-clipped importance ratio against the rollout log-probs)
    kind: str = "rkl"
    beta: float = 0.5  # jsd only; 0 and 1 are fkl and rkl
    temperature: float = 1.0  # distillation temperature applied to both sides' logits
    clip_ratio: float = 0.2  # sampled_rkl only: the ratio is clipped to [1 - clip_ratio, 1 + clip_ratio]
    sft_weight: float = 1.0  # the hybrid (data.gold_prefix_field): weight of the gold tokens' cross-entropy
    chunk_size: int = 0  # tokens per chunk of the fused loss; 0 = chosen from V

    def __post_init__(self):
        _require(self.kind in LOSSES, f"loss.kind={self.kind!r} is unknown: use one of {', '.join(LOSSES)}")
        _require(0 <= self.beta <= 1, f"loss.beta={self.beta} must be in [0, 1]")
        _require(self.temperature > 0, f"loss.temperature={self.temperature} must be > 0")
        _require(self.chunk_size >= 0, f"loss.chunk_size={self.chunk_size} must be >= 0 (0 = automatic)")
        _require(0 < self.clip_ratio < 1, f"loss.clip_ratio={self.clip_ratio} must be in (0, 1)")
        _require(self.sft_weight >= 0, f"loss.sft_weight={self.sft_weight} must be >= 0")


@dataclass(frozen=True, kw_only=True)
class LearnerConfig:
    lr: float = 1e-3
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float = 1.0
    warmup_steps: int = 0
    lr_schedule: str = "constant"  # constant | linear | cosine (decay to 0 at train.steps, after warmup)
    # Tokens (prompt + response) per micro-batch: the step's sequences are packed into rows of at most this many
    # tokens and the gradients accumulated, so the step's memory follows this budget, not the batch; the loss
    # and gradient are the whole batch's (normalised by all its response tokens). 0: the whole batch at once.
    micro_batch_tokens: int = 0
    gradient_checkpointing: bool = False  # recompute each decoder layer's activations in backward
    # The student's forward/backward under autocast in this dtype (bfloat16: bf16 matmuls, fp32 master weights,
    # gradients and optimizer; the loss's softmax and divergences stay fp32)
    compute_dtype: str = "float32"

    def __post_init__(self):
        _require(self.compute_dtype in ("float32", "bfloat16"),
                 f"learner.compute_dtype={self.compute_dtype!r} is unknown: use float32 or bfloat16")
        _require(self.micro_batch_tokens >= 0,
                 f"learner.micro_batch_tokens={self.micro_batch_tokens} must be >= 0 (0 = the whole batch at once)")
        _require(self.lr > 0, f"learner.lr={self.lr} must be > 0")
        _require(self.weight_decay >= 0, f"learner.weight_decay={self.weight_decay} must be >= 0")
        _require(len(self.adam_betas) == 2 and all(0 <= b < 1 for b in self.adam_betas),
                 f"learner.adam_betas={self.adam_betas} must be two numbers in [0, 1)")
        _require(self.max_grad_norm > 0, f"learner.max_grad_norm={self.max_grad_norm} must be > 0")
        _require(self.warmup_steps >= 0, f"learner.warmup_steps={self.warmup_steps} must be >= 0")
        _require(self.lr_schedule in LR_SCHEDULES,
                 f"learner.lr_schedule={self.lr_schedule!r} is unknown: use one of {', '.join(LR_SCHEDULES)}")


@dataclass(frozen=True, kw_only=True)
class TeacherConfig:
    # Tokens (prompt + response) per forward: the teacher scores the step's sequences packed into rows of at most
    # this many tokens, one row at a time (it keeps no activations, so it can take more than the learner).
    # 0: the whole batch at once.
    micro_batch_tokens: int = 0

    def __post_init__(self):
        _require(self.micro_batch_tokens >= 0,
                 f"teacher.micro_batch_tokens={self.micro_batch_tokens} must be >= 0 (0 = the whole batch at once)")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    steps: int
    prompts_per_step: int
    seed: int = 0
    eval_every: int = 0  # 0: evaluate at start and end only
    save_every: int = 0  # checkpoint (run_dir/checkpoints/step_<N>/) every N steps; 0: only at the end
    keep_checkpoints: int = 2  # the newest N checkpoints stay, older ones are deleted
    max_consecutive_skips: int = 5  # stop when N steps in a row had a non-finite loss or gradient (0: never)

    def __post_init__(self):
        _require(self.steps > 0, f"train.steps={self.steps} must be > 0")
        _require(self.prompts_per_step > 0, f"train.prompts_per_step={self.prompts_per_step} must be > 0")
        _require(self.eval_every >= 0, f"train.eval_every={self.eval_every} must be >= 0")
        _require(self.save_every >= 0, f"train.save_every={self.save_every} must be >= 0 (0 = only at the end)")
        _require(self.keep_checkpoints > 0, f"train.keep_checkpoints={self.keep_checkpoints} must be > 0")
        _require(self.max_consecutive_skips >= 0,
                 f"train.max_consecutive_skips={self.max_consecutive_skips} must be >= 0 (0 = never stop)")


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    mode: str = "cpu"
    # auto: the mode's devices (GPUs for colocated / split); cpu: run a GPU mode's plumbing (serving buffer,
    # handles) on the CPU, for debugging and tests
    device: str = "auto"
    out_dir: str = "runs"  # a run writes out_dir/<name>/
    name: str = ""  # empty: a timestamp
    ray_address: str = ""  # empty: RAY_ADDRESS if set (ray job submit), else a fresh local Ray instance
    cpus_per_actor: float = 0.5  # Ray scheduling share of each actor
    threads_per_actor: int = 1  # torch threads inside each actor (one is robust on a busy 2-core box)
    progress: bool = True
    resume: str = ""  # a run directory to continue from its latest checkpoint (set by --resume RUN_DIR)
    rollout_replicas: int = 1  # rollout actors; the step's prompts are split between them
    teacher_replicas: int = 1  # teacher actors; the step's samples are split between them
    # learner actors training one student data-parallel (torch FSDP2: parameters, gradients and optimizer state
    # sharded across them; NCCL on GPUs, gloo on CPU); each trains its share of the step's micro-batches
    learner_replicas: int = 1
    # colocated mode's GPUs: each holds one rollout engine, one teacher and one learner shard (the data-parallel
    # colocated layout); the replica counts left at 1 follow it
    gpus: int = 1
    # split mode: sample step k+1 while the learner trains step k (one step off-policy, `sync/policy_lag`)
    overlap: bool = False
    # cpu / colocated: a rollout or teacher actor that dies is restarted (Ray max_restarts) up to this many times
    # and the step retried; 0 turns it off
    max_actor_restarts: int = 3
    # experiment trackers beside the run directory's files, comma-separated: tensorboard, wandb, mlflow
    # (opd/trackers.py; each an optional extra)
    loggers: str = ""

    def __post_init__(self):
        unknown = [n for n in (x.strip() for x in self.loggers.split(",")) if n and n not in TRACKERS]
        _require(not unknown, f"run.loggers: {', '.join(map(repr, unknown))} unknown: use any of "
                              f"{', '.join(TRACKERS)}, comma-separated (the run directory's files are always written)")
        _require(self.max_actor_restarts >= 0, f"run.max_actor_restarts={self.max_actor_restarts} must be >= 0")
        _require(self.rollout_replicas > 0, f"run.rollout_replicas={self.rollout_replicas} must be > 0")
        _require(self.teacher_replicas > 0, f"run.teacher_replicas={self.teacher_replicas} must be > 0")
        _require(not self.overlap or self.mode == "split",
                 f"run.overlap=true needs run.mode=split (the rollout and learner need their own devices), "
                 f"not {self.mode}")
        _require(self.mode in MODES, f"run.mode={self.mode!r} is unknown: use one of {', '.join(MODES)}")
        _require(self.device in ("auto", "cpu"), f"run.device={self.device!r} is unknown: use auto or cpu")
        _require(self.cpus_per_actor > 0, f"run.cpus_per_actor={self.cpus_per_actor} must be > 0")
        _require(not self.name or (Path(self.name).name == self.name and self.name not in (".", "..")),
                 f"run.name={self.name!r} must be one folder name (no '/', no '..'): the run is written to "
                 f"run.out_dir/<run.name>")
        _require(self.threads_per_actor > 0, f"run.threads_per_actor={self.threads_per_actor} must be > 0")
        self._check_layout()

    def _check_layout(self) -> None:
        """run.gpus and run.learner_replicas against the mode; colocated's replica counts left at 1 follow gpus."""
        _require(self.learner_replicas > 0, f"run.learner_replicas={self.learner_replicas} must be > 0")
        _require(self.gpus > 0, f"run.gpus={self.gpus} must be > 0")
        _require(self.gpus == 1 or self.mode == "colocated",
                 f"run.gpus={self.gpus} is the colocated layout's GPU count: use run.mode=colocated (split mode's "
                 f"GPUs follow run.rollout_replicas / run.teacher_replicas; cpu mode uses run.learner_replicas)")
        _require(self.learner_replicas == 1 or self.mode != "split",
                 f"run.learner_replicas={self.learner_replicas}: split mode keeps one learner GPU; for a "
                 f"data-parallel learner on GPUs use run.mode=colocated with run.gpus=N")
        if self.mode != "colocated":
            return
        _require(self.learner_replicas in (1, self.gpus),
                 f"run.learner_replicas={self.learner_replicas}: colocated mode puts one learner shard on each GPU; "
                 f"set run.gpus={self.learner_replicas} instead")
        for name in ("rollout_replicas", "teacher_replicas", "learner_replicas"):
            n = getattr(self, name)
            _require(self.gpus == 1 or n in (1, self.gpus),
                     f"run.{name}={n} with run.gpus={self.gpus}: colocated mode puts one of each on every GPU; "
                     f"leave run.{name} at 1 or set it to {self.gpus}")
            object.__setattr__(self, name, self.gpus if self.gpus > 1 else n)  # frozen: resolved once, here


@dataclass(frozen=True, kw_only=True)
class BenchConfig:
    """`driver.py --bench` (opd/programs/bench.py): timed steps on fixed-length responses, per phase, with a roofline."""

    enabled: bool = False  # set by --bench
    shapes: str = ""  # a pair of assets/shapes with random weights (opd/shapes.py SHAPE_PAIRS); "" = model.*
    num_layers: int = 0  # keep the first N decoder layers of each shape (0 = all): real widths on a CPU
    vocab_size: int = 0  # output rows of both shapes (0 = theirs)
    warmup_steps: int = 1  # untimed steps first (allocator, caches, lazy initialisation)
    steps: int = 3  # timed steps
    prompt_tokens: int = 64  # random prompt ids per prompt (the response length is rollout.max_new_tokens)
    peak_tflops: float = 0.0  # the roofline's device peak FLOP rate (0: the datasheet table, or measured on CPU)
    peak_gbps: float = 0.0  # the roofline's device memory bandwidth in GB/s (0: as above)

    def __post_init__(self):
        _require(self.num_layers >= 0, f"bench.num_layers={self.num_layers} must be >= 0 (0 = all)")
        _require(self.vocab_size >= 0, f"bench.vocab_size={self.vocab_size} must be >= 0 (0 = the shapes')")
        _require(self.warmup_steps >= 0, f"bench.warmup_steps={self.warmup_steps} must be >= 0")
        _require(self.steps > 0, f"bench.steps={self.steps} must be > 0")
        _require(self.prompt_tokens > 0, f"bench.prompt_tokens={self.prompt_tokens} must be > 0")
        _require(self.peak_tflops >= 0 and self.peak_gbps >= 0, "bench.peak_tflops and bench.peak_gbps must be >= 0")


@dataclass(frozen=True, kw_only=True)
class Config:
    model: ModelConfig
    train: TrainConfig
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    run: RunConfig = field(default_factory=RunConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)

    def __post_init__(self):
        for section in dataclasses.fields(self):  # `inf` and `nan` parse as floats and pass `> 0`
            for f in dataclasses.fields(getattr(self, section.name)):
                value = getattr(getattr(self, section.name), f.name)
                numbers = value if isinstance(value, tuple) else (value,)
                _require(all(math.isfinite(v) for v in numbers if isinstance(v, float)),
                         f"{section.name}.{f.name}={value} is not a finite number: give a finite value")
        # The importance ratio compares the student's distribution with the sampler's: they must be the same one.
        _require(self.loss.kind != "sampled_rkl" or self.loss.temperature == self.rollout.temperature,
                 f"loss.kind=sampled_rkl needs loss.temperature ({self.loss.temperature}) equal to "
                 f"rollout.temperature ({self.rollout.temperature}): set one to the other")

        _require(self.loss.kind != "sampled_rkl" or self.rollout.student_fraction == 1,
                 f"loss.kind=sampled_rkl needs the student's own samples (its importance ratio is against the "
                 f"sampler's log-probs), rollout.student_fraction={self.rollout.student_fraction}: use 1 or a "
                 f"full-vocabulary loss (fkl, rkl, jsd)")
        _require(not self.rollout.compile or self.run.mode == "cpu",
                 f"rollout.compile=true compiles the hf engine's CPU decode loop: use it with run.mode=cpu (the "
                 f"GPU modes' engine is SGLang), not run.mode={self.run.mode}")
        _require(not self.data.gold_prefix_field or self.rollout.student_fraction == 1,
                 f"data.gold_prefix_field (the hybrid) trains on the student's continuations of gold prefixes; "
                 f"rollout.student_fraction={self.rollout.student_fraction} would mix in off-policy samples: use 1")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def resolve_path(path: str) -> Path:
    """Model and output paths: absolute as given, relative to the project root otherwise."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else PROJECT_ROOT / p
