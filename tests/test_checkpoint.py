"""Checkpoints without Ray: exact round trip of the learner's state, in-place restore into the shared buffer,
manifest checks, pruning, a writer killed mid-save, atomic records, and the resume's config check."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, get_scheduler

from opd.transport import weights
from opd import checkpoint
from opd.config import ConfigError
from opd.overrides import config_from_dict, override
from opd.presets import PRESETS, tiny_cpu
from opd.metrics import RunStopped, SkipGuard, atomic_path, truncate_jsonl

IDS = torch.tensor([[3, 4, 14, 5, 6, 15, 3, 8], [7, 7, 14, 1, 2, 15, 9, 9]])


def _learner(root):
    """The objects a LearnerActor checkpoints: fp32 student, AdamW, a warmup + cosine schedule."""
    model = AutoModelForCausalLM.from_pretrained(root / "assets/toy/student", dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, optimizer, get_scheduler("cosine", optimizer, num_warmup_steps=2, num_training_steps=10)


def _step(model, optimizer, scheduler) -> None:
    """A step that draws from every global generator (as dropout or a sampler would), so the RNG restore counts."""
    noise = 1 + 0.1 * torch.rand(()) + 0.1 * random.random() + 0.1 * float(np.random.rand())
    loss = model(input_ids=IDS, labels=IDS).loss * noise
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    scheduler.step()


def _save(path, model, optimizer, scheduler, root, version=0, step=0):
    return checkpoint.write(path, lambda tmp: checkpoint.save_learner(
        tmp, model, optimizer, scheduler, version=version, tokenizer_source=str(root / "assets/toy/student")),
        {"step": step})


def test_round_trip_continues_bit_for_bit(root, tmp_path):
    model, optimizer, scheduler = _learner(root)
    for _ in range(3):
        _step(model, optimizer, scheduler)
    path = _save(tmp_path / "checkpoints" / "step_3", model, optimizer, scheduler, root, version=3, step=3)
    at_save = model.model.norm.weight.detach().clone()
    for _ in range(2):
        _step(model, optimizer, scheduler)
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    fresh, fresh_optimizer, fresh_scheduler = _learner(root)  # the start weights, another RNG position
    torch.rand(100), random.random(), np.random.rand(7)
    assert checkpoint.load_learner(path, fresh, fresh_optimizer, fresh_scheduler) == 3
    for _ in range(2):
        _step(fresh, fresh_optimizer, fresh_scheduler)
    got = fresh.state_dict()
    differ = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert not differ, f"{len(differ)} tensors differ after the resume, e.g. {differ[:3]}"
    assert fresh_scheduler.get_last_lr() == scheduler.get_last_lr()
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight  # still tied
    # the student is a plain Hugging Face checkpoint too
    assert torch.equal(AutoModelForCausalLM.from_pretrained(path).model.norm.weight, at_save)
    assert (path / "tokenizer.json").is_file() and (path / "model.safetensors").is_file()


def test_restore_writes_into_the_shared_buffer_the_engine_maps(root, tmp_path):
    """cpu mode: the engine's parameters are views of the learner's buffer; a restore must reach them."""
    model, optimizer, scheduler = _learner(root)
    for _ in range(3):  # past the warmup's lr = 0 first step
        _step(model, optimizer, scheduler)
    path = _save(tmp_path / "step_3", model, optimizer, scheduler, root, version=3)
    saved_norm = model.model.norm.weight.detach().clone()

    learner, learner_optimizer, learner_scheduler = _learner(root)
    shared = weights.share_parameters(learner, "test-restore")
    try:
        engine = AutoModelForCausalLM.from_pretrained(root / "assets/toy/student", dtype=torch.float32)
        weights.attach_parameters(engine, shared)
        pointers = [p.data_ptr() for p in learner.parameters()]
        assert not torch.equal(engine.model.norm.weight, saved_norm)
        checkpoint.load_learner(path, learner, learner_optimizer, learner_scheduler)
        assert [p.data_ptr() for p in learner.parameters()] == pointers  # same storage, not new tensors
        assert torch.equal(engine.model.norm.weight, saved_norm)
        assert torch.equal(engine.lm_head.weight, model.lm_head.weight)
    finally:
        weights.release(shared)


def test_manifest_catches_a_flipped_byte_a_truncation_and_a_missing_file(root, tmp_path):
    model, optimizer, scheduler = _learner(root)
    path = _save(checkpoint.step_dir(tmp_path, 1), model, optimizer, scheduler, root)
    files = checkpoint.verify(path)
    assert {"model.safetensors", "trainer_state.pt", "tokenizer.json", "run_state.json"} <= set(files)
    weights_file = path / "model.safetensors"
    data = bytearray(weights_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights_file.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match=r"model\.safetensors does not match its sha256"):
        checkpoint.verify(path)
    weights_file.write_bytes(bytes(data[:-10]))
    with pytest.raises(ConfigError, match=r"model\.safetensors has \d+ bytes, the manifest says"):
        checkpoint.verify(path)
    weights_file.unlink()
    with pytest.raises(ConfigError, match=r"model\.safetensors is missing"):
        checkpoint.verify(path)
    (path / checkpoint.MANIFEST).unlink()
    assert checkpoint.complete(tmp_path) == []  # without its manifest a folder is not a checkpoint
    with pytest.raises(ConfigError, match="is incomplete"):
        checkpoint.verify(path)


def test_prune_keeps_the_newest_and_removes_leftovers(root, tmp_path):
    model, optimizer, scheduler = _learner(root)
    for step in (2, 4, 6, 10):
        _save(checkpoint.step_dir(tmp_path, step), model, optimizer, scheduler, root, step=step)
    leftover = tmp_path / "checkpoints" / ".step_12.tmp-abc"
    leftover.mkdir()
    (tmp_path / "checkpoints" / "step_99").mkdir()  # no manifest: not a checkpoint
    checkpoint.prune(tmp_path, keep=2)
    assert [s for s, _ in checkpoint.complete(tmp_path)] == [6, 10]  # numeric order, not string order
    assert not leftover.exists()
    assert checkpoint.latest(tmp_path) == checkpoint.step_dir(tmp_path, 10)


KILLED_WRITER = """
import sys, time
from pathlib import Path
import torch
from transformers import AutoModelForCausalLM
from opd import checkpoint

root, run_dir = Path(sys.argv[1]), Path(sys.argv[2])
model = AutoModelForCausalLM.from_pretrained(root / "assets/toy/student", dtype=torch.float32)
optimizer = torch.optim.AdamW(model.parameters())
scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)

def fill(tmp, block=False):
    checkpoint.save_learner(tmp, model, optimizer, scheduler, version=0, tokenizer_source=str(root / "assets/toy/student"))
    if block:  # half written: weights on disk, no manifest yet
        (run_dir / "half_written").touch()
        time.sleep(600)

with torch.no_grad():
    for p in model.parameters():
        p.add_(1.0)
checkpoint.write(checkpoint.step_dir(run_dir, 1), fill, {"step": 1})
with torch.no_grad():
    for p in model.parameters():
        p.add_(1.0)
checkpoint.write(checkpoint.step_dir(run_dir, 2), lambda tmp: fill(tmp, block=True), {"step": 2})
"""


def test_writer_killed_mid_save_leaves_the_previous_checkpoint(root, tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(root), str(tmp_path)], cwd=root,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "half_written").exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the writer never reached the second save"
            time.sleep(0.1)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    partial = list((tmp_path / "checkpoints").glob(".step_2.tmp-*"))
    assert len(partial) == 1 and (partial[0] / "model.safetensors").is_file()  # it was killed mid-save
    assert not checkpoint.step_dir(tmp_path, 2).exists()
    assert checkpoint.latest(tmp_path) == checkpoint.step_dir(tmp_path, 1)
    checkpoint.verify(checkpoint.step_dir(tmp_path, 1))
    model, optimizer, scheduler = _learner(root)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    checkpoint.load_learner(checkpoint.step_dir(tmp_path, 1), model, optimizer, scheduler)
    assert all(torch.equal(v, start[k] + 1.0) for k, v in model.state_dict().items())  # step 1's weights
    assert checkpoint.clean_partial(tmp_path) == partial and not partial[0].exists()


def test_truncate_jsonl_keeps_steps_up_to_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": s / 10}) + "\n" for s in range(1, 6)) + '{"step": 6, "lo')
    kept = truncate_jsonl(path, 3)
    assert [r["step"] for r in kept] == [1, 2, 3]
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]
    path.write_text('{"step": 1}\n{"step": 2\n{"step": 3}\n')
    with pytest.raises(ConfigError, match=r"metrics\.jsonl:2: a corrupt record"):
        truncate_jsonl(path, 3)
    assert truncate_jsonl(tmp_path / "absent.jsonl", 3) == []


def test_atomic_path_keeps_the_old_file_when_a_write_fails(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["config.json"]
    with atomic_path(path) as tmp:
        tmp.write_text("new")
    assert path.read_text() == "new"


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_config_round_trips_through_its_json(name):
    cfg = PRESETS[name]()
    assert config_from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_unknown_setting_in_a_saved_config_is_refused():
    saved = tiny_cpu().to_dict()
    saved["train"]["nope"] = 1
    with pytest.raises(ConfigError, match=r"unknown settings \['nope'\]"):
        config_from_dict(saved, "run/config.json")


def test_resume_refuses_another_model_and_allows_more_steps(tmp_path, capsys):
    saved = json.loads(json.dumps(tiny_cpu().to_dict()))
    with pytest.raises(ConfigError, match="model.student='assets/toy/student', this run has 'other/model'"):
        checkpoint.check_compatible(saved, override(tiny_cpu(), "model.student=other/model"), tmp_path)
    with pytest.raises(ConfigError, match="learner.lr=0.002"):
        checkpoint.check_compatible(saved, override(tiny_cpu(), "learner.lr=1e-4"), tmp_path)
    checkpoint.check_compatible(saved, override(tiny_cpu(), "train.steps=900"), tmp_path)
    assert "cosine learning-rate schedule follows the new length" in capsys.readouterr().err


def test_skip_guard_stops_after_k_skipped_steps_in_a_row(tmp_path):
    guard = SkipGuard(3, tmp_path)
    for step, skipped in enumerate([1, 1, 0, 1, 1], start=1):  # a finite step resets the streak
        guard.check(step, {"step/skipped": float(skipped)})
    with pytest.raises(RunStopped, match=r"step 6: the last 3 steps \(from step 4\).*lower learner\.lr"):
        guard.check(6, {"step/skipped": 1.0})
    never = SkipGuard(0, tmp_path)
    for step in range(1, 20):
        never.check(step, {"step/skipped": 1.0})


def test_checkpoint_files_get_the_modes_of_the_users_umask(tmp_path):
    """mkdtemp makes a 0700 folder; a checkpoint is meant to be read by other processes as any folder is."""
    import stat

    old = os.umask(0o027)
    try:
        path = checkpoint.write(tmp_path / "checkpoints" / "step_1", lambda d: (d / "model.safetensors").write_bytes(
            b"x" * 10), {"step": 1})
    finally:
        os.umask(old)
    modes = {p.relative_to(tmp_path).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in path.rglob("*")}
    assert stat.S_IMODE(path.stat().st_mode) == 0o750
    assert modes == {"checkpoints/step_1/model.safetensors": 0o640, "checkpoints/step_1/run_state.json": 0o640,
                     "checkpoints/step_1/manifest.json": 0o640}
