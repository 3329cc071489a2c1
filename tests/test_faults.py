"""Actor faults on CPU: SIGKILL the rollout actor and then a teacher actor of a running driver; Ray restarts
them, the driver gives the new engine the learner's weights and retries the step, and the run ends with every
step and the same metrics as an undisturbed run. A killed learner stops the run with the resume command."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import CALM_ARGS, CALM_STEPS
from opd.metrics import read_jsonl


STEPS = CALM_STEPS
COMPARED = ("loss", "kl/forward/mean", "kl/reverse/mean", "grad/norm", "response/tokens/sum", "policy/version")


def _args(out: Path, name: str, *extra: str) -> list[str]:
    return [sys.executable, "driver.py", *CALM_ARGS, "--set", f"run.out_dir={out}", "--set", f"run.name={name}", *extra]


def _actor_pid(driver: subprocess.Popen, title: str) -> int:
    """The pid of the Ray worker process running actor class `title` for *this* driver (a descendant of the
    process the test started: Ray's private instance is started by it)."""
    for _ in range(600):
        for proc in psutil.Process(driver.pid).children(recursive=True):
            try:
                if proc.cmdline() and proc.cmdline()[0].startswith(f"ray::{title}"):
                    return proc.pid
            except psutil.NoSuchProcess:
                continue
        time.sleep(0.1)
    raise AssertionError(f"no ray::{title} process under the driver")


def _wait_for_steps(path: Path, n: int, driver: subprocess.Popen) -> None:
    while not (path.exists() and len(path.read_text().splitlines()) >= n):
        if driver.poll() is not None:
            raise AssertionError(f"the driver ended before the fault was injected:\n{driver.stderr.read()[-3000:]}")
        time.sleep(0.02)


@pytest.mark.slow
def test_killed_rollout_and_teacher_are_restarted_and_no_step_is_lost(root, tmp_path, calm_run):

    driver = subprocess.Popen(_args(tmp_path, "faults"), cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    try:
        metrics = tmp_path / "faults" / "metrics.jsonl"
        _wait_for_steps(metrics, 3, driver)
        psutil.Process(_actor_pid(driver, "RolloutActor")).send_signal(signal.SIGKILL)
        _wait_for_steps(metrics, 6, driver)
        psutil.Process(_actor_pid(driver, "TeacherActor")).send_signal(signal.SIGKILL)
        stdout, stderr = driver.communicate(timeout=600)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 0, stderr[-3000:]
    assert stdout.count("restarting the actor and retrying the step") == 2, stdout[-2000:]

    calm, faults = read_jsonl(calm_run / "metrics.jsonl"), read_jsonl(metrics)
    assert [r["step"] for r in faults] == list(range(1, STEPS + 1))  # no step lost, none repeated
    assert sum(r["step/actor_restarts"] for r in faults) == 2
    for got, want in zip(faults, calm, strict=True):  # a retried step resamples the same prompts, same seed
        for key in COMPARED:
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), (got["step"], key)
    assert all(r["logprob/learner_minus_rollout/absmax"] < 1e-4 for r in faults)  # restarted engine got weights


@pytest.mark.slow
@pytest.mark.parametrize("replicas", [1, 2])
def test_a_killed_learner_stops_the_run_with_the_resume_command(root, tmp_path, replicas):
    """One learner, or one of two learner replicas (the other then waits in a collective: the run still stops)."""
    driver = subprocess.Popen(_args(tmp_path, "learner", "--set", f"run.learner_replicas={replicas}"), cwd=root,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_steps(tmp_path / "learner" / "metrics.jsonl", 2, driver)
        psutil.Process(_actor_pid(driver, "LearnerActor")).send_signal(signal.SIGKILL)
        _, stderr = driver.communicate(timeout=300)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 1
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: step ") and "a learner actor died" in last
    assert f"python driver.py --resume {tmp_path / 'learner'}" in last and "Traceback" not in stderr
