"""run.loggers: TensorBoard, Weights & Biases (offline) and MLflow (local file store) get the run's metrics under
the names and steps of metrics.jsonl / eval.jsonl, and the resolved config as hyper-parameters. The run goes
through the `opd train` console script, and leaves its report.html."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from opd.config import ConfigError
from opd.metrics import read_jsonl
from opd.overrides import override
from opd.presets import tiny_cpu


@pytest.mark.slow
def test_a_run_with_all_three_trackers(root, tmp_path, monkeypatch, pypi_kernels):
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "MLFLOW_TRACKING_URI": "",
           "WANDB_PROJECT": "opd-test"}
    args = ["--set", "train.steps=3", "--set", "train.eval_every=2", "--set", "train.prompts_per_step=8",
            "--set", "data.num_eval_prompts=16", "--set", f"run.out_dir={tmp_path}", "--set", "run.name=tracked",
            "--set", "run.progress=false", "--set", "run.loggers=tensorboard,wandb,mlflow"]
    opd = Path(sys.executable).parent / "opd"  # the console script, from another directory than the project's
    out = subprocess.run([str(opd), "train", *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    run_dir = tmp_path / "tracked"
    steps, evals = read_jsonl(run_dir / "metrics.jsonl"), read_jsonl(run_dir / "eval.jsonl")

    # TensorBoard: the event files read back by TensorBoard's own reader
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()["scalars"]
    for key in ("loss", "kl/reverse/mean", "timing/step_s"):
        events = acc.Scalars(key)
        assert [e.step for e in events] == [r["step"] for r in steps]
        assert [e.value for e in events] == pytest.approx([r[key] for r in steps], rel=1e-6)
    events = acc.Scalars("eval/kl/reverse/mean")
    assert [e.step for e in events] == [r["step"] for r in evals] == [0, 2, 3]
    assert [e.value for e in events] == pytest.approx([r["eval/kl/reverse/mean"] for r in evals], rel=1e-6)
    assert "eval/accuracy/student" in tags
    assert "config/text_summary" in acc.Tags()["tensors"]  # the resolved config as text
    plugin = acc.PluginTagToContent("hparams")
    assert "_hparams_/session_start_info" in plugin
    from tensorboard.plugins.hparams import plugin_data_pb2

    info = plugin_data_pb2.HParamsPluginData.FromString(plugin["_hparams_/session_start_info"]).session_start_info
    assert info.hparams["train.steps"].number_value == 3 and info.hparams["loss.kind"].string_value == "rkl"

    # Weights & Biases, offline: its run folder beside the run's files, with the history it recorded
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and list(offline[0].glob("run-*.wandb")), list((run_dir / "wandb").iterdir())

    # MLflow: the local file store under the run directory
    import mlflow

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # what the run set for itself (MLflow 3's opt-in)
    client = mlflow.MlflowClient(tracking_uri=(run_dir / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name("opd")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "tracked" and run.data.params["train.steps"] == "3"
    history = client.get_metric_history(run.info.run_id, "loss")
    history = sorted((m.step, m.value) for m in history)
    assert [h[0] for h in history] == [r["step"] for r in steps]
    assert [h[1] for h in history] == pytest.approx([r["loss"] for r in steps], rel=1e-6)
    assert not math.isnan(run.data.metrics["eval/accuracy/teacher"])
    assert (run_dir / "report.html").is_file() and "Learning curves" in (run_dir / "report.html").read_text()


def test_unknown_or_missing_trackers_are_refused_before_anything_runs(monkeypatch):
    with pytest.raises(ConfigError, match="'neptune' unknown: use any of tensorboard, wandb, mlflow"):
        override(tiny_cpu(), "run.loggers=tensorboard,neptune")
    from opd import trackers

    real = trackers.importlib.util.find_spec
    monkeypatch.setattr(trackers.importlib.util, "find_spec", lambda name: None if name == "wandb" else real(name))
    with pytest.raises(ConfigError, match=r'run.loggers=wandb needs the wandb package: pip install -e "\.\[wandb\]"'):
        trackers.check(override(tiny_cpu(), "run.loggers=wandb"))
    trackers.check(override(tiny_cpu(), "run.loggers=tensorboard"))  # installed: accepted
