"""Stopping a real driver: SIGTERM, SIGINT to its process group (Ctrl-C), SIGKILL (two SIGINTs: in process). Each
graceful stop ends at a step boundary with a checkpoint, the run's records and the resume command (exit 143 /
130); after every stop, SIGKILL included once the next start has reclaimed its leftovers, no /dev/shm file and no
process of the stopped run is left; and the run resumed after all four ends with the metrics of an undisturbed
run, step for step."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import CALM_ARGS, CALM_STEPS
from opd.metrics import read_jsonl


STEPS = CALM_STEPS
COMPARED = ("loss", "kl/forward/mean", "kl/reverse/mean", "grad/norm", "response/tokens/sum", "policy/version")


def _shm() -> set[Path]:
    return set(Path("/dev/shm").glob("opd-*.bin"))


def _tagged(tag: str) -> list[str]:
    """The processes carrying `tag` in their environment: the driver and everything of its Ray instance."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if f"OPD_TEST_TAG={tag}".encode() in (proc / "environ").read_bytes():
                found.append(f"{proc.name} {(proc / 'cmdline').read_bytes()[:60]!r}")
        except OSError:
            continue
    return found


def _start(root, out, tag, *args) -> subprocess.Popen:
    env = {**os.environ, "OPD_TEST_TAG": tag}
    return subprocess.Popen([sys.executable, "driver.py", *args], cwd=root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _wait_for_steps(path: Path, n: int, driver: subprocess.Popen) -> None:
    deadline = time.monotonic() + 300
    while not (path.exists() and len(path.read_text().splitlines()) >= n):
        if driver.poll() is not None:
            raise AssertionError(f"the driver ended before step {n}:\n{driver.stderr.read()[-3000:]}")
        assert time.monotonic() < deadline, f"no step {n} within 300 s"
        time.sleep(0.05)


def _until_gone(tag: str) -> list[str]:
    """Bounded: Ray's processes of a stopped run take a moment to exit."""
    deadline = time.monotonic() + 60
    while (left := _tagged(tag)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


@pytest.mark.slow
def test_signals_stop_cleanly_and_the_run_resumes_exactly(root, tmp_path, calm_run):
    run = tmp_path / "stopped"
    metrics = run / "metrics.jsonl"
    launch = [*CALM_ARGS, "--set", f"run.out_dir={tmp_path}", "--set", "run.name=stopped"]
    # (stop after step, signal, to the group, expected exit, what the line says)
    stops = [(3, signal.SIGTERM, False, 143, "stopped by SIGTERM after step "),
             (6, signal.SIGINT, True, 130, "stopped by SIGINT after step "),
             (9, signal.SIGKILL, False, -9, None)]
    killed = None
    for i, (at, sig, group, code, said) in enumerate(stops):
        tag, before = f"t{os.getpid()}-{i}", _shm()
        driver = _start(root, tmp_path, tag, *(launch if i == 0 else ["--resume", str(run)]))
        _wait_for_steps(metrics, at, driver)
        if killed is not None:  # this start has reclaimed what the SIGKILLed run left
            assert _until_gone(killed[0]) == [] and not (killed[1] & _shm())
        ours = _shm() - before
        (os.killpg if group else os.kill)(driver.pid, sig)
        _, stderr = driver.communicate(timeout=300)
        assert driver.returncode == code, stderr[-3000:]
        if said is not None:
            last = stderr.strip().splitlines()[-1]
            assert last.startswith(said) and last.endswith(f"continue with: python driver.py --resume {run}"), last
            assert "Traceback" not in stderr and "SIGTERM received" not in stderr, stderr[-3000:]
            assert (run / "metrics.parquet").exists() and (run / "report.html").exists()
            assert _until_gone(tag) == [] and not (ours & _shm()), "a graceful stop leaves nothing behind"
        else:
            killed = (tag, ours)
            assert ours & _shm(), "SIGKILL: the learner's file is still there until the next start"
    tag = f"t{os.getpid()}-last"
    final = _start(root, tmp_path, tag, "--resume", str(run))
    _, stderr = final.communicate(timeout=600)
    assert final.returncode == 0, stderr[-3000:]
    assert _until_gone(killed[0]) == [] and not (killed[1] & _shm())
    got, want = read_jsonl(metrics), read_jsonl(calm_run / "metrics.jsonl")
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    for a, b in zip(got, want, strict=True):
        for key in COMPARED:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a["step"], key)


def test_a_second_signal_stops_at_once(tmp_path):
    """The first signal asks for a stop at the step's end; the second raises at once, wherever the driver is."""
    from opd.programs import train
    from opd.metrics import Interrupted

    said, before = [], signal.getsignal(signal.SIGINT)  # SIG_IGN when the suite runs as a background job
    with pytest.raises(Interrupted) as info, train.StopSignals(said.append, tmp_path) as stop:
        os.kill(os.getpid(), signal.SIGINT)
        deadline = time.monotonic() + 10
        while stop.signum is None and time.monotonic() < deadline:  # the handler runs between bytecodes
            time.sleep(0.01)
        assert said == ["SIGINT: stopping after this step, with a checkpoint (again: at once)"]
        os.kill(os.getpid(), signal.SIGINT)
        while time.monotonic() < deadline:
            time.sleep(0.01)
    assert info.value.signum == signal.SIGINT
    assert str(info.value) == "stopped at once by a second SIGINT; no checkpoint was written yet: start the run again"
    assert signal.getsignal(signal.SIGINT) == before  # the handlers are put back
