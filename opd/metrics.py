"""The run directory's records: resolved config, per-step metrics (JSONL, then parquet), evaluations, plot.

Metrics are flat `dict[str, float]` with the reduction in the key (`kl/reverse/mean`, `timing/teacher_s`).
Only the driver writes them.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


class RunLog:
    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self._steps = open(run_dir / "metrics.jsonl", "a", buffering=1)  # line-buffered: a crash loses no line
        self._evals = open(run_dir / "eval.jsonl", "a", buffering=1)

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        self._steps.write(json.dumps({"step": step, **metrics}) + "\n")

    def log_data_counts(self, counts: dict[str, int]) -> None:
        """Data counters (prompts kept, skipped for length, ...) once per run, next to the config."""
        write_json_atomic(self.run_dir / "data_counts.json", counts)

    def log_eval(self, step: int, metrics: dict[str, float]) -> None:
        self._evals.write(json.dumps({"step": step, **metrics}) + "\n")

    def close(self) -> None:
        self._steps.close()
        self._evals.close()
        rows = read_jsonl(self.run_dir / "metrics.jsonl")
        if rows:
            pq.write_table(pa.Table.from_pylist(rows), self.run_dir / "metrics.parquet")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


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
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
