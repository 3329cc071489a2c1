"""One typed config tree, presets as functions, and `--set a.b=value` overrides.

Every class is frozen and validated on construction: a bad value raises `ConfigError` (a `ValueError`)
naming the field and the fix, before Ray or any model starts.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
LOSSES = ("fkl", "rkl", "jsd", "sampled_rkl")
MODES = ("cpu", "colocated", "split")
ENGINES = ("hf",)
LR_SCHEDULES = ("constant", "linear", "cosine")


class ConfigError(ValueError):
    """A user or config error: one line that names the problem and the fix."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    student: str  # local Hugging Face folder (relative paths resolve against the project root)
    teacher: str

    def __post_init__(self):
        _require(bool(self.student), "model.student is empty: give a Hugging Face model folder")
        _require(bool(self.teacher), "model.teacher is empty: give a Hugging Face model folder")


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    source: str = "toy_addition"  # the embedded task (opd/toy.py)
    num_eval_prompts: int = 256  # held-out prompts used by evaluation

    def __post_init__(self):
        _require(self.source == "toy_addition", f"data.source={self.source!r} is unknown: use 'toy_addition'")
        _require(self.num_eval_prompts > 0, f"data.num_eval_prompts={self.num_eval_prompts} must be > 0")


@dataclass(frozen=True, kw_only=True)
class RolloutConfig:
    engine: str = "hf"
    num_samples: int = 1  # responses sampled per prompt
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    max_new_tokens: int = 8

    def __post_init__(self):
        _require(self.engine in ENGINES, f"rollout.engine={self.engine!r} is unknown: use one of {ENGINES}")
        _require(self.num_samples > 0, f"rollout.num_samples={self.num_samples} must be > 0")
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
    chunk_size: int = 0  # tokens per chunk of the fused loss; 0 = chosen from V

    def __post_init__(self):
        _require(self.kind in LOSSES, f"loss.kind={self.kind!r} is unknown: use one of {', '.join(LOSSES)}")
        _require(0 <= self.beta <= 1, f"loss.beta={self.beta} must be in [0, 1]")
        _require(self.temperature > 0, f"loss.temperature={self.temperature} must be > 0")
        _require(self.chunk_size >= 0, f"loss.chunk_size={self.chunk_size} must be >= 0 (0 = automatic)")
        _require(0 < self.clip_ratio < 1, f"loss.clip_ratio={self.clip_ratio} must be in (0, 1)")


@dataclass(frozen=True, kw_only=True)
class LearnerConfig:
    lr: float = 1e-3
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float = 1.0
    warmup_steps: int = 0
    lr_schedule: str = "constant"  # constant | linear | cosine (decay to 0 at train.steps, after warmup)

    def __post_init__(self):
        _require(self.lr > 0, f"learner.lr={self.lr} must be > 0")
        _require(self.weight_decay >= 0, f"learner.weight_decay={self.weight_decay} must be >= 0")
        _require(len(self.adam_betas) == 2 and all(0 <= b < 1 for b in self.adam_betas),
                 f"learner.adam_betas={self.adam_betas} must be two numbers in [0, 1)")
        _require(self.max_grad_norm > 0, f"learner.max_grad_norm={self.max_grad_norm} must be > 0")
        _require(self.warmup_steps >= 0, f"learner.warmup_steps={self.warmup_steps} must be >= 0")
        _require(self.lr_schedule in LR_SCHEDULES,
                 f"learner.lr_schedule={self.lr_schedule!r} is unknown: use one of {', '.join(LR_SCHEDULES)}")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    steps: int
    prompts_per_step: int
    seed: int = 0
    eval_every: int = 0  # 0: evaluate at start and end only

    def __post_init__(self):
        _require(self.steps > 0, f"train.steps={self.steps} must be > 0")
        _require(self.prompts_per_step > 0, f"train.prompts_per_step={self.prompts_per_step} must be > 0")
        _require(self.eval_every >= 0, f"train.eval_every={self.eval_every} must be >= 0")


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    mode: str = "cpu"
    out_dir: str = "runs"  # a run writes out_dir/<name>/
    name: str = ""  # empty: a timestamp
    ray_address: str = ""  # empty: RAY_ADDRESS if set (ray job submit), else a fresh local Ray instance
    cpus_per_actor: float = 0.5  # Ray scheduling share of each actor
    threads_per_actor: int = 1  # torch threads inside each actor (one is robust on a busy 2-core box)
    progress: bool = True

    def __post_init__(self):
        _require(self.mode in MODES, f"run.mode={self.mode!r} is unknown: use one of {', '.join(MODES)}")
        _require(self.cpus_per_actor > 0, f"run.cpus_per_actor={self.cpus_per_actor} must be > 0")
        _require(self.threads_per_actor > 0, f"run.threads_per_actor={self.threads_per_actor} must be > 0")


@dataclass(frozen=True, kw_only=True)
class Config:
    model: ModelConfig
    train: TrainConfig
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self):
        # The importance ratio compares the student's distribution with the sampler's: they must be the same one.
        _require(self.loss.kind != "sampled_rkl" or self.loss.temperature == self.rollout.temperature,
                 f"loss.kind=sampled_rkl needs loss.temperature ({self.loss.temperature}) equal to "
                 f"rollout.temperature ({self.rollout.temperature}): set one to the other")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- presets


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


PRESETS = {"tiny_cpu": tiny_cpu}


def preset(name: str) -> Config:
    _require(name in PRESETS, f"preset {name!r} is unknown: use one of {', '.join(PRESETS)}")
    return PRESETS[name]()


# ---------------------------------------------------------------- overrides


def _parse_value(raw: str, hint) -> object:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if raw.lower() in ("none", "null"):
            return None
        return _parse_value(raw, args[0])
    if origin is tuple:
        parts = [p for p in raw.strip("()[] ").split(",") if p.strip()]
        return tuple(_parse_value(p.strip(), a) for p, a in zip(parts, typing.get_args(hint), strict=True))
    if hint is bool:
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(raw)
    if hint in (int, float):
        return hint(raw)
    return raw


def override(cfg, assignment: str):
    """Return `cfg` with one `section.field=value` assignment applied (validated again)."""
    key, sep, raw = assignment.partition("=")
    _require(bool(sep) and bool(key), f"--set {assignment!r}: write it as section.field=value")
    path = key.strip().split(".")

    def apply(node, names):
        hints = typing.get_type_hints(type(node))
        name = names[0]
        _require(dataclasses.is_dataclass(node) and name in hints,
                 f"--set {key}: no such setting; settings are {_setting_names(cfg)}")
        if len(names) == 1:
            _require(not dataclasses.is_dataclass(getattr(node, name)),
                     f"--set {key}: is a section; set one of its fields")
            try:
                value = _parse_value(raw.strip(), hints[name])
            except (ValueError, TypeError):
                raise ConfigError(f"--set {key}={raw}: expected a value of type {hints[name]}") from None
            return dataclasses.replace(node, **{name: value})
        return dataclasses.replace(node, **{name: apply(getattr(node, name), names[1:])})

    return apply(cfg, path)


def _setting_names(cfg) -> str:
    names = []
    for section in dataclasses.fields(cfg):
        names += [f"{section.name}.{f.name}" for f in dataclasses.fields(getattr(cfg, section.name))]
    return ", ".join(names)


def resolve_path(path: str) -> Path:
    """Model and output paths: absolute as given, relative to the project root otherwise."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else PROJECT_ROOT / p
