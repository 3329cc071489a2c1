"""The run directory's records: resolved config, per-step metrics (JSONL, then parquet), evaluations, plot.

Metrics are flat `dict[str, float]` with the reduction in the key (`kl/reverse/mean`, `timing/teacher_s`).
Only the driver writes them.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from opd.config import ConfigError


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary sibling to write instead of `path`, renamed over it once complete: readers (and a run that
    crashed mid-write) see the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # a read-only directory: the write's own error is the one to report, not this cleanup's
            pass


def write_json_atomic(path: Path, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")


class RunStopped(RuntimeError):
    """The run stopped itself (e.g. too many non-finite steps); the message names the step and what to try."""


class Interrupted(BaseException):
    """SIGINT / SIGTERM stopped the run: at a step boundary, or at once on a second signal. A BaseException, like
    KeyboardInterrupt: no `except Exception` on the way out takes it for a failure. The driver exits 128 + signum."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


class SkipGuard:
    """Counts the learner's skipped (non-finite) steps in a row; `check` stops the run at `limit` (0: never)."""

    def __init__(self, limit: int, run_dir: Path):
        self.limit, self.run_dir, self.streak = limit, run_dir, 0

    def check(self, step: int, metrics: dict[str, float]) -> None:
        self.streak = self.streak + 1 if metrics["step/skipped"] else 0
        if self.limit and self.streak >= self.limit:
            raise RunStopped(
                f"step {step}: the last {self.streak} steps (from step {step - self.streak + 1}) had a non-finite "
                f"loss or gradient and were skipped (train.max_consecutive_skips={self.limit}); the run stopped. "
                f"Try a lower learner.lr or learner.max_grad_norm, and check the data and the teacher for "
                f"NaN/inf; checkpoints are in {self.run_dir / 'checkpoints'}")


class RunLog:
    """metrics.jsonl and eval.jsonl, line by line, and the same records to the run's trackers (opd/trackers.py)."""

    def __init__(self, run_dir: Path, trackers=None):
        self.run_dir, self.trackers = run_dir, trackers
        # a resumed run's evaluations so far (its preflight dropped the records of steps after the checkpoint)
        self.eval_rows = read_jsonl(run_dir / "eval.jsonl") if (run_dir / "eval.jsonl").exists() else []
        self._steps = open(run_dir / "metrics.jsonl", "a", buffering=1)  # line-buffered: a crash loses no line
        self._evals = open(run_dir / "eval.jsonl", "a", buffering=1)

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        self._steps.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.trackers is not None:
            self.trackers.log(step, metrics)

    def log_data_counts(self, counts: dict[str, int]) -> None:
        """Data counters (prompts kept, skipped for length, ...) once per run, next to the config."""
        write_json_atomic(self.run_dir / "data_counts.json", counts)

    def log_eval(self, step: int, metrics: dict[str, float]) -> None:
        self._evals.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.trackers is not None:
            self.trackers.log(step, metrics)

    def close(self) -> None:
        self._steps.close()
        self._evals.close()
        rows = read_jsonl(self.run_dir / "metrics.jsonl")
        if rows:
            with atomic_path(self.run_dir / "metrics.parquet") as tmp:
                pq.write_table(pa.Table.from_pylist(rows), tmp)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def truncate_jsonl(path: Path, last_step: int) -> list[dict]:
    """Keep the records of steps <= `last_step` (rewritten atomically) and return them. A torn last line, which
    a crash mid-write can leave, is dropped; a bad line anywhere else is a corrupt file."""
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except ValueError:
            if i < len(lines) - 1:
                raise ConfigError(f"{path}:{i + 1}: a corrupt record (not JSON): fix or delete the line") from None
    kept = [r for r in rows if r["step"] <= last_step]
    if len(kept) < len(lines):
        with atomic_path(path) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    return kept


def plot_learning_curve(run_dir: Path) -> Path:
    """learning_curve.png: training loss and KL per step; held-out KL and accuracy at each evaluation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = read_jsonl(run_dir / "metrics.jsonl")
    evals = read_jsonl(run_dir / "eval.jsonl")
    fig, (ax_train, ax_kl, ax_acc) = plt.subplots(1, 3, figsize=(15, 4))
    x = [r["step"] for r in steps]
    values = []
    for key in ("loss", "kl/reverse/mean", "kl/forward/mean", "kl/reverse/sampled_mean"):
        if steps and key in steps[0]:
            ys = [r[key] for r in steps]
            values += ys
            ax_train.plot(x, ys, label=key, linewidth=0.8, linestyle=":" if key == "loss" else "-")
    # log scale for KLs; the sampled estimator's surrogate loss can be negative
    ax_train.set(title="training (per step)", xlabel="step",
                 yscale="log" if values and min(values) > 0 else "symlog")
    ax_train.legend()
    ex = [r["step"] for r in evals]
    for key in ("eval/kl/reverse/mean", "eval/kl/forward/mean"):
        ax_kl.plot(ex, [r[key] for r in evals], marker="o", label=key)
    ax_kl.set(title="held-out KL to the teacher", xlabel="step", yscale="log")
    ax_kl.legend()
    ax_acc.plot(ex, [r["eval/accuracy/student"] for r in evals], marker="o", label="student")
    teacher = [r["eval/accuracy/teacher"] for r in evals if not math.isnan(r.get("eval/accuracy/teacher", math.nan))]
    if teacher:
        ax_acc.axhline(teacher[0], color="gray", linestyle="--", label="teacher")
    ax_acc.set(title="held-out task accuracy", xlabel="step", ylim=(0, 1.05))
    ax_acc.legend()
    fig.tight_layout()
    path = run_dir / "learning_curve.png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return path


def loss_metrics(batch, by_source, nll: float, *, sampled: bool, cfg) -> dict[str, float]:
    """A step's loss metrics from the learner's sums (over every replica): `by_source` `[SOURCES, 3]`, each
    source's sums of the divergence's stats (sampled_rkl: advantage, ratio, clipped tokens; else forward KL,
    reverse KL, student entropy), and `nll`, the gold-prefix tokens' summed negative log-likelihood. Means are
    per token of the divergence (every response token but the hybrid's gold ones); with
    rollout.student_fraction < 1 per source too, with each source's samples and tokens."""
    import torch

    from opd.batch import SOURCES, STUDENT

    names = (("kl/reverse/sampled_mean", -1.0), ("is_ratio/mean", 1.0), ("is_ratio/clipped_fraction", 1.0)) \
        if sampled else (("kl/forward/mean", 1.0), ("kl/reverse/mean", 1.0), ("entropy/student/mean", 1.0))
    stats, trained = by_source.sum(0), ~batch.gold
    n, n_trained = batch.num_response_tokens, int(trained.sum())
    metrics = {name: sign * float(stats[i]) / n_trained for i, (name, sign) in enumerate(names)}
    if cfg.rollout.student_fraction < 1:
        tokens = torch.bincount(batch.token_source()[trained], minlength=len(SOURCES)).tolist()
        samples = torch.bincount(batch.source, minlength=len(SOURCES)).tolist()
        for s in (STUDENT, SOURCES.index(cfg.rollout.off_policy_source)):
            source = SOURCES[s]
            metrics[f"source/{source}/samples"] = float(samples[s])
            metrics[f"source/{source}/tokens"] = float(tokens[s])
            metrics.update({f"source/{source}/{name}": sign * float(by_source[s, i]) / tokens[s]
                            if tokens[s] else float("nan") for i, (name, sign) in enumerate(names)})
    if cfg.data.gold_prefix_field:  # the hybrid
        metrics["sft/gold_tokens"] = float(n - n_trained)
        metrics["sft/nll/mean"] = nll / (n - n_trained) if n > n_trained else float("nan")
    return metrics
