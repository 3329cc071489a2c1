"""Exact resume end to end on CPU: a run resumed from its step-8 checkpoint reproduces the uninterrupted run's
steps 9..12 exactly; and no credential from the environment reaches a run directory or the console.

The uninterrupted run is the session's (conftest.calm_run: 12 steps, a checkpoint every 4, credentials in its
environment); one driver run here: a copy of it cut back to what a crash after step 11 leaves (checkpoint 8,
records of steps 9-11 and a torn line, a half-written checkpoint 12), resumed."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import CALM_SAVE_EVERY, CALM_STEPS, SECRETS
from opd import checkpoint
from opd.metrics import read_jsonl

LAST, KEPT = CALM_STEPS, CALM_STEPS - CALM_SAVE_EVERY  # the final checkpoint, and the one the crash left
NOT_COMPARED = ("timing/", "throughput/", "memory/")  # wall-clock and allocator readings


def _driver(root, *args) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "driver.py", *args], cwd=root, capture_output=True, text=True,
                         timeout=600, env={**os.environ, **SECRETS})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def runs(root, calm_run, tmp_path_factory):
    whole, cut = calm_run, tmp_path_factory.mktemp("resume") / "cut"
    shutil.copytree(whole, cut)
    shutil.rmtree(cut / "checkpoints" / f"step_{LAST}")
    half = cut / "checkpoints" / f".step_{LAST}.tmp-crashed"  # half written
    shutil.copytree(whole / "checkpoints" / f"step_{LAST}", half)
    (half / checkpoint.MANIFEST).unlink()
    metrics = (cut / "metrics.jsonl").read_text().splitlines(keepends=True)
    (cut / "metrics.jsonl").write_text("".join(metrics[:LAST - 1]) + metrics[LAST - 1][:40])  # the last one torn
    (cut / "eval.jsonl").write_text((whole / "eval.jsonl").read_text().splitlines(keepends=True)[0])
    console = (whole.parent / "calm.console").read_text()
    return whole, cut, [console, _driver(root, "--resume", str(cut), "--set", "run.progress=false")]


def _compared(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith(NOT_COMPARED)}


def test_resumed_run_reproduces_the_uninterrupted_run(runs):
    whole, cut, _ = runs
    expected, got = read_jsonl(whole / "metrics.jsonl"), read_jsonl(cut / "metrics.jsonl")
    assert [r["step"] for r in got] == list(range(1, LAST + 1))  # one run: steps 9-11 of the crashed one dropped
    assert expected[KEPT]["loss"] != expected[KEPT + 1]["loss"]  # the steps differ: equality below means something
    for want, have in zip(expected[KEPT:], got[KEPT:], strict=True):
        differ = {k: (want[k], have.get(k)) for k in _compared(want) if have.get(k) != want[k]}
        assert not differ, f"step {want['step']}: {differ}"
    assert [r["step"] for r in read_jsonl(cut / "eval.jsonl")] == [0, LAST]
    assert _compared(read_jsonl(cut / "eval.jsonl")[-1]) == _compared(read_jsonl(whole / "eval.jsonl")[-1])


def test_final_checkpoints_are_identical_and_leftovers_are_gone(runs):
    whole, cut, _ = runs
    assert [s for s, _ in checkpoint.complete(whole)] == [KEPT, LAST]  # train.keep_checkpoints=2
    assert [s for s, _ in checkpoint.complete(cut)] == [KEPT, LAST]
    assert not list((cut / "checkpoints").glob(".step_*"))  # the half-written checkpoint was cleaned up
    want, have = (checkpoint.verify(checkpoint.step_dir(d, LAST)) for d in (whole, cut))
    for name in ("model.safetensors", "trainer_state.pt"):  # weights, optimizer, scheduler, RNG: bit for bit
        assert have[name]["sha256"] == want[name]["sha256"], name
    state = checkpoint.read_run_state(checkpoint.step_dir(cut, LAST))
    assert state["step"] == LAST
    assert state["data"] == checkpoint.read_run_state(checkpoint.step_dir(whole, LAST))["data"]
    config = json.loads((cut / "config.json").read_text())
    assert config["run"]["resume"] == str(cut) and config["run"]["name"] == "cut"


def test_no_credential_reaches_the_run_directory_or_the_console(runs):
    whole, cut, outputs = runs
    leaks = []
    for run_dir in (whole, cut):
        for f in run_dir.rglob("*"):
            if f.is_file():
                data = f.read_bytes()
                leaks += [(str(f), k) for k, v in SECRETS.items() if v.encode() in data]
    for out in outputs:
        text = out if isinstance(out, str) else out.stdout + out.stderr
        leaks += [("console", k) for k, v in SECRETS.items() if v in text]
    assert not leaks
    assert "run directory:" in outputs[0] and "run directory:" in outputs[1].stdout  # the consoles were read
    assert (whole / "config.json").is_file() and (whole / "checkpoints" / f"step_{LAST}" / "trainer_state.pt").is_file()
