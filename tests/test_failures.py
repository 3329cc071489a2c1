"""Failures after preflight: one `error:` line naming the cause, what to do, and the --resume command when a
checkpoint exists (the traceback kept in RUN_DIR/error.log); non-finite weights after a step stop the run."""

from __future__ import annotations

import errno
import shutil
import subprocess
import sys

import pytest
import ray
import torch

from opd.programs import train
from opd.actors.learner import LearnerActor
from opd import checkpoint
from conftest import CALM_STEPS
from opd.overrides import override
from opd.presets import tiny_cpu


def _run_dir_with_a_checkpoint(tmp_path):
    run = tmp_path / "run"
    (checkpoint.step_dir(run, 2)).mkdir(parents=True)
    (checkpoint.step_dir(run, 2) / checkpoint.MANIFEST).write_text('{"format": 1, "files": {}}')
    return run


def test_disk_full_during_a_checkpoint_is_one_line_with_the_resume_command(tmp_path):
    run = _run_dir_with_a_checkpoint(tmp_path)
    full = OSError(errno.ENOSPC, "No space left on device", str(run / "checkpoints/.step_4.tmp-x/model.safetensors"))
    line = train.failure(full, run)
    assert line == (f"the run failed: No space left on device: {run}/checkpoints/.step_4.tmp-x/model.safetensors "
                    f"(traceback: {run / 'error.log'}); free disk space, then continue from step_2 with: "
                    f"python driver.py --resume {run}")
    assert "OSError: [Errno 28] No space left on device" in (run / "error.log").read_text()


def test_an_actors_error_is_unwrapped(tmp_path):
    """What the learner raised, as the driver receives it: a RayTaskError carrying the actor's exception."""
    run = _run_dir_with_a_checkpoint(tmp_path)
    try:
        raise OSError(errno.EROFS, "Read-only file system", str(run / "checkpoints"))
    except OSError as e:
        wrapped = ray.exceptions.RayTaskError("LearnerActor.save_checkpoint", "Traceback ...\nOSError: ...", e)
    line = train.failure(wrapped, run)
    assert line.startswith(f"the run failed: Read-only file system: {run}/checkpoints (traceback: ")
    assert line.endswith(f"; make {run} writable, then continue from step_2 with: python driver.py --resume {run}")


def test_without_a_checkpoint_or_a_writable_run_directory(tmp_path):
    missing = tmp_path / "gone"  # error.log cannot be written there: the line says nothing of it
    line = train.failure(RuntimeError("something\nand more"), missing)
    assert line == "the run failed: RuntimeError: something; fix that, then start the run again (it wrote no checkpoint)"


@pytest.mark.slow
def test_a_failure_after_preflight_through_the_driver(root, tmp_path, calm_run):
    """A real driver whose run directory refuses a write at the end (report.html is a folder): exit 1, one line,
    the resume command; the run's records and checkpoint are intact."""
    run = tmp_path / "r"
    shutil.copytree(calm_run, run)
    (run / "report.html").unlink()
    (run / "report.html").mkdir()
    out = subprocess.run([sys.executable, "driver.py", "--resume", str(run), "--set", f"train.steps={CALM_STEPS + 1}"],
                         cwd=root, capture_output=True, text=True, timeout=600)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 1 and lines[-1].startswith("error: the run failed: Is a directory: "), out.stderr[-2000:]
    assert lines[-1].endswith(f"then continue from step_{CALM_STEPS + 1} with: python driver.py --resume {run}")
    assert "Traceback" not in out.stderr and "Traceback" in (run / "error.log").read_text()
    assert len((run / "metrics.jsonl").read_text().splitlines()) == CALM_STEPS + 1


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_non_finite_weights_after_a_step_stop_the_run(root):
    cfg = override(tiny_cpu(), "train.prompts_per_step=4")
    from opd.actors.rollout import RolloutActor
    from opd.actors.teacher import TeacherActor

    learner, teacher, rollout = LearnerActor(cfg), TeacherActor(cfg), RolloutActor(cfg)
    learner.set_teacher_head(teacher.output_head())
    rollout.load_weights(learner.export_weights())
    batch = rollout.generate([[3, 4, 14, 5, 6, 15]] * 4, seed=0)
    parts = list(teacher.score(batch))
    step, weight = learner.optimizer.step, next(learner.model.parameters())

    def overflowing_step():  # a finite loss and gradient whose update overflows one weight
        step()
        with torch.no_grad():
            weight.view(-1)[0] = float("inf")

    learner.optimizer.step = overflowing_step
    with pytest.raises(RuntimeError, match=r"optimizer step 1 made the student's weights non-finite"):
        learner.train_step(batch, parts)


def test_a_failed_atomic_write_reports_its_own_error(tmp_path, monkeypatch):
    """A read-only run directory: the write fails, and the cleanup of its temporary file fails too; the error
    raised must be the write's (it was hidden behind the cleanup's, two chained OSErrors)."""
    from pathlib import Path

    from opd.metrics import write_json_atomic

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / ".x.json.tmp"))

    monkeypatch.setattr(Path, "write_text", read_only)
    monkeypatch.setattr(Path, "unlink", read_only)
    with pytest.raises(OSError) as info:
        write_json_atomic(tmp_path / "x.json", {"a": 1})
    assert info.value.errno == errno.EROFS and info.value.__context__ is None
