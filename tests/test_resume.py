"""Exact resume end to end on CPU: a run resumed from its step-3 checkpoint reproduces the uninterrupted run's
steps 4..6 exactly; and no credential from the environment reaches a run directory or the console.

Two driver runs in all (module fixture): the whole run, then a copy of it cut back to what a crash after step 5
leaves (checkpoint 3, records of steps 4 and 5 and a torn line, a half-written checkpoint), resumed."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from opd import checkpoint
from opd.metrics import read_jsonl

SECRETS = {"HF_TOKEN": "hf_opdTestSecretA1b2C3d4E5f6", "HUGGING_FACE_HUB_TOKEN": "hf_opdTestSecretHubZ9y8X7",
           "RAY_AUTH_TOKEN": "0123456789abcdef" * 4}
SETTINGS = ["train.steps=6", "train.save_every=3", "train.eval_every=0", "train.prompts_per_step=8",
            "data.num_eval_prompts=16", "run.progress=false"]
NOT_COMPARED = ("timing/", "throughput/", "memory/")  # wall-clock and allocator readings


def _driver(root, *args) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "driver.py", *args], cwd=root, capture_output=True, text=True,
                         timeout=600, env={**os.environ, **SECRETS})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def runs(root, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("runs")
    sets = [a for s in SETTINGS + [f"run.out_dir={out_dir}", "run.name=whole"] for a in ("--set", s)]
    outputs = [_driver(root, *sets)]
    whole, cut = out_dir / "whole", out_dir / "cut"
    shutil.copytree(whole, cut)
    shutil.rmtree(cut / "checkpoints" / "step_6")
    shutil.copytree(whole / "checkpoints" / "step_6", cut / "checkpoints" / ".step_6.tmp-crashed")  # half written
    (cut / "checkpoints" / ".step_6.tmp-crashed" / checkpoint.MANIFEST).unlink()
    metrics = (cut / "metrics.jsonl").read_text().splitlines(keepends=True)
    (cut / "metrics.jsonl").write_text("".join(metrics[:5]) + metrics[5][:40])  # steps 1-5, step 6 torn
    (cut / "eval.jsonl").write_text((whole / "eval.jsonl").read_text().splitlines(keepends=True)[0])
    outputs.append(_driver(root, "--resume", str(cut), "--set", "run.progress=false"))
    return whole, cut, outputs


def _compared(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith(NOT_COMPARED)}


def test_resumed_run_reproduces_the_uninterrupted_run(runs):
    whole, cut, _ = runs
    expected, got = read_jsonl(whole / "metrics.jsonl"), read_jsonl(cut / "metrics.jsonl")
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5, 6]  # one run: steps 4-5 of the crashed one were dropped
    assert expected[3]["loss"] != expected[4]["loss"]  # the steps differ, so equality below means something
    for want, have in zip(expected[3:], got[3:], strict=True):
        differ = {k: (want[k], have.get(k)) for k in _compared(want) if have.get(k) != want[k]}
        assert not differ, f"step {want['step']}: {differ}"
    assert [r["step"] for r in read_jsonl(cut / "eval.jsonl")] == [0, 6]
    assert _compared(read_jsonl(cut / "eval.jsonl")[-1]) == _compared(read_jsonl(whole / "eval.jsonl")[-1])


def test_final_checkpoints_are_identical_and_leftovers_are_gone(runs):
    whole, cut, _ = runs
    assert [s for s, _ in checkpoint.complete(whole)] == [3, 6]  # train.keep_checkpoints=2
    assert [s for s, _ in checkpoint.complete(cut)] == [3, 6]
    assert not list((cut / "checkpoints").glob(".step_*"))  # the half-written checkpoint was cleaned up
    want, have = (checkpoint.verify(checkpoint.step_dir(d, 6)) for d in (whole, cut))
    for name in ("model.safetensors", "trainer_state.pt"):  # weights, optimizer, scheduler, RNG: bit for bit
        assert have[name]["sha256"] == want[name]["sha256"], name
    state = checkpoint.read_run_state(checkpoint.step_dir(cut, 6))
    assert state["step"] == 6 and state["data"] == checkpoint.read_run_state(checkpoint.step_dir(whole, 6))["data"]
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
        leaks += [("console", k) for k, v in SECRETS.items() if v in out.stdout + out.stderr]
    assert not leaks
    assert (whole / "config.json").is_file() and (whole / "checkpoints" / "step_6" / "trainer_state.pt").is_file()
