"""Experiment trackers beside the run directory's files: `run.loggers=tensorboard,wandb,mlflow` (any of them).

Each gets the metrics of `metrics.jsonl` and `eval.jsonl` under the same names and steps, and the resolved config
as hyper-parameters. Each is an optional extra (`pip install -e ".[tensorboard]"`, `[wandb]`, `[mlflow]`); a
missing one is refused before Ray starts (`check`).

* tensorboard: event files in `runs/<name>/tensorboard/` (`tensorboard --logdir runs`); the config as hparams and
  as a text summary.
* wandb: `wandb.init(dir=runs/<name>, name=<name>, config=...)`; the environment decides the rest as usual
  (`WANDB_MODE=offline` writes `runs/<name>/wandb/offline-run-*`, `WANDB_PROJECT`, `WANDB_ENTITY`). Without a
  project set, the project is `opd`.
* mlflow: a local file store at `runs/<name>/mlruns` unless `MLFLOW_TRACKING_URI` says otherwise; experiment
  `MLFLOW_EXPERIMENT_NAME` or `opd`; one MLflow run per run (a resumed run opens a new one).
"""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path

from opd.config import Config, ConfigError

def names(cfg: Config) -> list[str]:
    return [n.strip() for n in cfg.run.loggers.split(",") if n.strip()]


def check(cfg: Config) -> None:
    """Refuse a tracker whose package is missing, with the install command (the names are checked by RunConfig)."""
    for name in names(cfg):
        if importlib.util.find_spec(name) is None:  # each tracker's package is named like it
            raise ConfigError(f"run.loggers={name} needs the {name} package: pip install -e \".[{name}]\"")


def flat_config(cfg: Config) -> dict[str, object]:
    """`section.field` -> value (tuples as strings), the form hyper-parameter tables take."""
    out = {}
    for section, fields in cfg.to_dict().items():
        for name, value in fields.items():
            out[f"{section}.{name}"] = str(value) if isinstance(value, tuple | list) or value is None else value
    return out


class Trackers:
    """The trackers of `run.loggers`, opened on the run directory."""

    def __init__(self, cfg: Config, run_dir: Path):
        self._open = [_OPENERS[name](cfg, Path(run_dir)) for name in names(cfg)]

    def log(self, step: int, metrics: dict[str, float]) -> None:
        finite = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and math.isfinite(v)}
        for tracker in self._open:
            tracker.log(step, finite)

    def close(self) -> None:
        for tracker in self._open:
            tracker.close()
        self._open = []


class _TensorBoard:
    def __init__(self, cfg: Config, run_dir: Path):
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        from opd.configfile import to_yaml

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        for summary in hparams(flat_config(cfg), {}):  # the config in TensorBoard's HPARAMS tab
            self.writer.file_writer.add_summary(summary)
        self.writer.add_text("config", "```\n" + to_yaml(cfg) + "```")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, cfg: Config, run_dir: Path):
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "opd"), name=run_dir.name, dir=str(run_dir),
                              config=cfg.to_dict(), reinit="create_new")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


class _MLflow:
    def __init__(self, cfg: Config, run_dir: Path):
        import mlflow

        self.mlflow = mlflow
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            # MLflow 3 keeps its file store in maintenance mode behind this opt-in; a database backend needs
            # SQLAlchemy (full mlflow): set MLFLOW_TRACKING_URI=sqlite:///... for one
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            mlflow.set_tracking_uri((run_dir / "mlruns").resolve().as_uri())
        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "opd"))
        self.run = mlflow.start_run(run_name=run_dir.name)
        mlflow.log_params(flat_config(cfg))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.mlflow.log_metrics(metrics, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


_OPENERS = {"tensorboard": _TensorBoard, "wandb": _WandB, "mlflow": _MLflow}
