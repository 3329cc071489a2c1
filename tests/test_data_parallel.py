"""The data-parallel learner (run.learner_replicas, FSDP2 over gloo on CPU) against the single learner.

In two processes without Ray (tests/dp_pair.py): one step on a batch whose micro-batch count is odd (so one
replica runs an empty pass), the same loss and weights as one learner and half its optimizer state each. Then end
to end under Ray (four driver runs, module fixture; the 2-replica one is docs/gpu.md's command with this test's
settings after it): 3 steps of the default preset with 2 learner replicas give
the single learner's weights; the data-parallel colocated layout (run.gpus=2, its plumbing on the CPU) gives cpu
mode's metrics; a run resumed from a 2-replica checkpoint is the uninterrupted one, bit for bit; another
replica count is refused.

The driver runs take two micro-batches a step, one per replica: the replicas' gradients then add up in the single
learner's order (g0 + g1), so the weights agree to rounding. With more micro-batches per replica the sum is
associated differently (rank 0's g0 + g2 + ..., then rank 1's): the metrics still agree within 1e-5, but Adam
divides by sqrt(v) + eps, and an element whose gradient is near eps (1e-8) turns a 1e-7 difference in it into up
to ~3e-5 in the weight after a few steps (measured, docs/LOG.md), as another learner.micro_batch_tokens does to
one learner's."""

import json
import math
import shlex
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from opd.actors.learner import LearnerActor
from dp_pair import run_pair, sample, step
from opd import checkpoint
from opd.config import ConfigError, RunConfig
from opd.data_parallel import share
from opd.metrics import read_jsonl
from opd.overrides import override
from opd.presets import tiny_cpu

BUDGET = "learner.micro_batch_tokens=12"  # one 7-token prompt + response each: 7 micro-batches (asserted)


def test_share_pads_every_replica_to_the_same_count():
    assert share(5, 0, 2) == [0, 2, 4] and share(5, 1, 2) == [1, 3, None]
    assert share(4, 1, 2) == [1, 3] and share(1, 1, 3) == [None] and share(0, 0, 2) == []
    for count in range(7):  # every micro-batch once, every replica the same number of passes
        shares = [share(count, r, 3) for r in range(3)]
        assert sorted(k for s in shares for k in s if k is not None) == list(range(count))
        assert {len(s) for s in shares} == {math.ceil(count / 3)}


def test_two_processes_take_one_learners_step(tmp_path):
    cfg = override(override(tiny_cpu(), BUDGET), "loss.kind=jsd")
    batch_file = sample(cfg, tmp_path / "batch.pt")
    saved = torch.load(batch_file, weights_only=False)
    packs = saved["batch"].micro_batches(12)
    assert len(packs) % 2 == 1, len(packs)  # replica 1 runs one empty pass
    single = LearnerActor(cfg)
    try:
        want, want_weights = step(single, saved)
        single_bytes = sum(v.numel() * v.element_size() for s in single.optimizer.state.values()
                           for v in s.values() if v.dim() > 0)
    finally:
        single.shutdown()
    replicas = run_pair(override(cfg, "run.learner_replicas=2"), batch_file, tmp_path)
    for r in replicas:  # every replica reports the whole step and holds the whole new weights
        for key in ("loss", "kl/forward/mean", "kl/reverse/mean", "entropy/student/mean", "grad/norm"):
            assert r["metrics"][key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key
        assert torch.allclose(r["weights"], want_weights, atol=1e-5, rtol=0)
    assert not torch.allclose(want_weights, saved_initial(cfg), atol=1e-5)  # the step moved the weights
    held = [r["optimizer_bytes"] for r in replicas]
    assert sum(held) == single_bytes and max(held) <= 0.51 * single_bytes, (held, single_bytes)


def saved_initial(cfg):
    learner = LearnerActor(cfg)
    try:
        return torch.cat([p.detach().flatten() for p in learner.model.parameters()]).clone()
    finally:
        learner.shutdown()


def test_layouts_are_checked_before_anything_starts():
    with pytest.raises(ConfigError, match=r"split mode keeps one learner GPU"):
        RunConfig(mode="split", learner_replicas=2)
    with pytest.raises(ConfigError, match=r"run.gpus=2 is the colocated layout's GPU count"):
        RunConfig(mode="cpu", gpus=2)
    with pytest.raises(ConfigError, match=r"set run.gpus=2 instead"):
        RunConfig(mode="colocated", learner_replicas=2)
    with pytest.raises(ConfigError, match=r"run.rollout_replicas=3 with run.gpus=2"):
        RunConfig(mode="colocated", gpus=2, rollout_replicas=3)
    run = RunConfig(mode="colocated", gpus=2)  # one of each on every GPU
    assert (run.rollout_replicas, run.teacher_replicas, run.learner_replicas) == (2, 2, 2)


def test_preflight_refuses_more_gpus_than_the_machine_has(monkeypatch):
    from opd import modes

    cfg = override(override(tiny_cpu(), "run.mode=colocated"), "run.gpus=2")
    monkeypatch.setattr(modes, "cuda_state", lambda: modes.CudaState("13.0", "580.65", 1, 1))
    with pytest.raises(ConfigError, match=r"run.mode=colocated needs 2 GPU\(s\), this machine has 1: use --mode cpu "
                                          r"or lower run.gpus"):
        modes.check_devices(cfg)
    monkeypatch.setattr(modes, "cuda_state", lambda: modes.CudaState("13.0", "580.65", 2, 2))
    modes.check_devices(cfg)  # two GPUs: accepted
    many = override(override(tiny_cpu(), "run.learner_replicas=4"), "run.cpus_per_actor=0.4")
    with pytest.raises(ConfigError, match=r"for 6 actors asks for 2.4 CPUs"):  # learners count as actors
        monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})
        modes.check_cpus(many)


def readme_command(root, page: str, start: str) -> list[str]:
    """The arguments of the line of `page` (README.md or a docs/ page) that starts with `start` (its comment
    dropped), as a user types them."""
    lines = [ln for ln in (root / page).read_text().splitlines() if ln.startswith(start)]
    assert len(lines) == 1, f"{page} shows one line starting {start!r}"
    return shlex.split(lines[0], comments=True)


def test_readme_memory_plan_of_two_gpus(root, capsys):
    from opd.programs import memory_plan

    args = readme_command(root, "docs/gpu.md",
                          ".venv/bin/python -m opd.programs.memory_plan --preset qwen25_1p5b_from_7b")
    assert args[:3] == [".venv/bin/python", "-m", "opd.programs.memory_plan"]
    memory_plan.main(args[3:])
    assert "each of GPUs 0-1 (H20, 96.0 GiB) needs 45.2 GiB" in capsys.readouterr().out
    memory_plan.main([a for a in args[3:] if a not in ("--set", "run.gpus=2")])  # the same on one GPU
    assert "GPU 0 (H20, 96.0 GiB) needs 70.8 GiB" in capsys.readouterr().out
    assert "45.2 GiB on each of two H20s, against 70.8 GiB on one" in (root / "docs" / "gpu.md").read_text()


def test_memory_plan_shards_the_learner():
    from opd.memory import plan
    from opd.memory_device import Device

    base = override(override(tiny_cpu(), "model.student=Qwen/Qwen2.5-1.5B-Instruct"),
                    "model.teacher=Qwen/Qwen2.5-7B-Instruct")
    one = override(base, "run.mode=colocated")
    two = override(one, "run.gpus=2")
    device = Device.gpu(96 << 30, "H20", 2)
    plans = {n: plan(c, device) for n, c in (("one", one), ("two", two))}
    terms = {n: {t.name: t.bytes for t in p.actors["learner"].terms} for n, p in plans.items()}
    for name in ("weights", "grads", "optimizer"):  # each replica holds half
        assert terms["two"][name] == pytest.approx(terms["one"][name] / 2, abs=4)
    assert terms["two"]["serving buffer"] == terms["one"]["serving buffer"]  # whole on every GPU
    assert 0 < terms["two"]["gathered by FSDP"] < terms["one"]["weights"]
    assert "gathered by FSDP" not in terms["one"]
    assert [u.name for u in plans["two"].uses] == ["each of GPUs 0-1"]
    assert plans["two"].uses[0].need_bytes < plans["one"].uses[0].need_bytes


# ---------------------------------------------------------------- end to end under Ray

COMMON = ["train.steps=3", "train.save_every=2", "train.eval_every=0", "train.prompts_per_step=2",
          "data.num_eval_prompts=16", "run.progress=false", "run.cpus_per_actor=0.25", BUDGET,
          "run.rollout_replicas=2", "run.teacher_replicas=2"]
NOT_COMPARED = ("timing/", "throughput/", "memory/")


def _driver(root, *args, ok=True) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "driver.py", *args], cwd=root, capture_output=True, text=True, timeout=600)
    assert (out.returncode == 0) == ok, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def _sets(settings) -> list[str]:
    return [a for s in settings for a in ("--set", s)]


@pytest.fixture(scope="module")
def runs(root, tmp_path_factory):
    out = tmp_path_factory.mktemp("dp")
    readme = readme_command(root, "docs/gpu.md",  # + the settings
                            ".venv/bin/python driver.py --set run.learner_replicas=2")[2:]
    named = {"one": [], "two": readme, "colocated": _sets(["run.mode=colocated", "run.device=cpu", "run.gpus=2"])}
    for name, extra in named.items():
        _driver(root, *extra, *_sets(COMMON + [f"run.out_dir={out}", f"run.name={name}"]))
    cut = out / "cut"  # the 2-replica run as a crash after step 2 leaves it, resumed
    shutil.copytree(out / "two", cut)
    shutil.rmtree(cut / "checkpoints" / "step_3")
    (cut / "metrics.jsonl").write_text("".join((out / "two" / "metrics.jsonl").read_text().splitlines(True)[:2]))
    (cut / "eval.jsonl").write_text((out / "two" / "eval.jsonl").read_text().splitlines(True)[0])
    _driver(root, "--resume", str(cut), "--set", "run.progress=false")
    return out


def _compared(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith(NOT_COMPARED)}


def _weights(run_dir, step=3) -> dict[str, torch.Tensor]:
    return load_file(checkpoint.step_dir(run_dir, step) / "model.safetensors")


def test_two_replicas_give_the_single_learners_weights(runs):
    one, two = read_jsonl(runs / "one" / "metrics.jsonl"), read_jsonl(runs / "two" / "metrics.jsonl")
    assert all(r["learner/micro_batches"] == 2 for r in two)  # one per replica (two 7-token prompts, budget 12)
    for a, b in zip(one, two, strict=True):
        for k in _compared(a):
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), (a["step"], k)
    want, have = _weights(runs / "one"), _weights(runs / "two")
    assert want.keys() == have.keys()  # the same Hugging Face checkpoint (tied weights saved once)
    assert max(float((want[k] - have[k]).abs().max()) for k in want) < 1e-5
    moved = _weights(runs / "one", 2)
    assert max(float((want[k] - moved[k]).abs().max()) for k in want) > 1e-4  # step 3 changed them: a real test
    for row_one, row_two in zip(one, two):  # the optimizer state: the same in all, half of it per replica
        total = row_one["memory/optimizer_state_bytes/total"]
        assert row_two["memory/optimizer_state_bytes/total"] == total > 0
        assert total / 2 <= row_two["memory/optimizer_state_bytes/replica_max"] <= 0.51 * total
    shards = sorted((checkpoint.step_dir(runs / "two", 3) / "optimizer").glob("*.distcp"))
    assert len(shards) == 2  # one file of optimizer state per replica, in torch.distributed.checkpoint's format


def test_colocated_layout_on_two_simulated_devices_gives_cpu_modes_metrics(runs):
    config = json.loads((runs / "colocated" / "config.json").read_text())["run"]
    assert (config["gpus"], config["rollout_replicas"], config["teacher_replicas"], config["learner_replicas"]) == (
        2, 2, 2, 2)
    one, colocated = read_jsonl(runs / "one" / "metrics.jsonl"), read_jsonl(runs / "colocated" / "metrics.jsonl")
    for a, b in zip(one, colocated, strict=True):
        for k in _compared(a):
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), (a["step"], k)


def test_resume_from_a_two_replica_checkpoint_is_exact(runs):
    two, cut = runs / "two", runs / "cut"
    want, have = read_jsonl(two / "metrics.jsonl"), read_jsonl(cut / "metrics.jsonl")
    assert [r["step"] for r in have] == [1, 2, 3]
    assert _compared(have[2]) == _compared(want[2])
    files = [checkpoint.verify(checkpoint.step_dir(d, 3)) for d in (two, cut)]
    for name in files[0]:  # weights and every replica's optimizer shards, bit for bit
        if name.endswith((".safetensors", ".distcp")) or name.startswith("rng_rank"):
            assert files[1][name]["sha256"] == files[0][name]["sha256"], name


def test_another_replica_count_is_refused(runs, root, tmp_path):
    run_dir = tmp_path / "cut"
    shutil.copytree(runs / "cut", run_dir)
    out = _driver(root, "--resume", str(run_dir), "--set", "run.learner_replicas=1", ok=False)
    assert "written with run.learner_replicas=2, this run has 1" in out.stderr
    config = json.loads((run_dir / "config.json").read_text())  # nothing written was lost
    assert config["run"]["learner_replicas"] == 2 and checkpoint.latest(run_dir).name == "step_3"
