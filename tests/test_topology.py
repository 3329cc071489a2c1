"""Modes -> placement: bundles, strategies and per-actor shares (no Ray needed); what each mode needs, device checks."""

import dataclasses

import pytest

from opd.cluster.placement import placement_plan
from opd import modes
from opd.config import ConfigError
from opd.presets import preset


def _places(plan):
    return [place for places in plan.actors.values() for place in places]


def _gpus_per_bundle(plan):
    used = [0.0] * len(plan.bundles)
    for place in _places(plan):
        used[place.bundle] += place.num_gpus
    return used


def _cpus_fit(plan):
    used = [0.0] * len(plan.bundles)
    for place in _places(plan):
        used[place.bundle] += place.num_cpus
    return all(u <= b["CPU"] + 1e-9 for u, b in zip(used, plan.bundles))


def test_cpu_mode_packs_one_cpu_bundle_per_actor_on_one_node():
    plan = placement_plan("cpu", 0.5)
    assert plan.strategy == "STRICT_PACK" and all("GPU" not in b for b in plan.bundles)
    assert sorted(p.bundle for p in _places(plan)) == [0, 1, 2] and all(p.num_gpus == 0 for p in _places(plan))
    plan = placement_plan("cpu", 0.25, rollout_replicas=3, teacher_replicas=2)
    assert [len(plan.actors[r]) for r in ("rollout", "teacher", "learner")] == [3, 2, 1]
    assert sorted(p.bundle for p in _places(plan)) == list(range(6)) and _cpus_fit(plan)


@pytest.mark.parametrize("replicas", [(1, 1), (2, 3)])
def test_colocated_shares_one_gpu_between_all_actors(replicas):
    plan = placement_plan("colocated", 0.5, rollout_replicas=replicas[0], teacher_replicas=replicas[1])
    assert len(plan.bundles) == 1 and plan.bundles[0]["GPU"] == 1 and plan.strategy == "STRICT_PACK"
    assert {p.bundle for p in _places(plan)} == {0}  # one device for all: CUDA IPC works
    assert 0 < _gpus_per_bundle(plan)[0] <= 1 + 1e-9 and all(0 < p.num_gpus < 1 for p in _places(plan))
    assert _cpus_fit(plan) and len(_places(plan)) == sum(replicas) + 1


def test_split_puts_the_learner_alone_on_a_gpu():
    plan = placement_plan("split", 1.0)
    assert [b.get("GPU") for b in plan.bundles] == [1, 1]
    (learner,), (rollout,), (teacher,) = plan.actors["learner"], plan.actors["rollout"], plan.actors["teacher"]
    assert learner.bundle != rollout.bundle == teacher.bundle
    assert _gpus_per_bundle(plan) == [1.0, 1.0] and _cpus_fit(plan)


def test_split_gives_each_replica_pair_its_own_gpu():
    # NCCL cannot hold two ranks of one group on one GPU: rollout replicas (weights group) and teacher replicas
    # (hidden-states group) must each be on distinct GPUs, none on the learner's.
    plan = placement_plan("split", 1.0, rollout_replicas=3, teacher_replicas=2)
    assert len(plan.bundles) == 4 and all(b["GPU"] == 1 for b in plan.bundles)
    rollout_gpus = [p.bundle for p in plan.actors["rollout"]]
    teacher_gpus = [p.bundle for p in plan.actors["teacher"]]
    assert len(set(rollout_gpus)) == 3 and len(set(teacher_gpus)) == 2
    assert plan.actors["learner"][0].bundle not in rollout_gpus + teacher_gpus
    assert all(0 < g <= 1 for g in _gpus_per_bundle(plan)) and _cpus_fit(plan)


def test_unknown_mode():
    with pytest.raises(ConfigError, match="run.mode='tpu' is unknown"):
        placement_plan("tpu", 1.0)


@pytest.mark.parametrize("mode", ["colocated", "split"])
def test_plumbing_on_cpu_asks_for_no_gpu(mode):
    plan = placement_plan(mode, 0.5, use_gpus=False, rollout_replicas=2)
    assert all("GPU" not in b for b in plan.bundles) and all(p.num_gpus == 0 for p in _places(plan))


def _cfg(mode, device="auto", **run):
    cfg = preset("tiny_cpu")
    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, mode=mode, device=device, **run))


@pytest.mark.parametrize("mode,needed", [("colocated", 1), ("split", 2)])
def test_gpu_mode_without_gpus_is_one_clear_error(mode, needed, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(ConfigError, match=rf"run.mode={mode} needs {needed} GPU\(s\), this machine has 0"):
        modes.check_devices(_cfg(mode))
    modes.check_devices(_cfg(mode, device="cpu"))  # the plumbing on CPU needs none


def test_split_counts_a_gpu_per_replica_pair(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr("torch.cuda.device_count", lambda: 2)
    modes.check_devices(_cfg("split"))
    modes.check_devices(_cfg("colocated", rollout_replicas=2, teacher_replicas=2))
    with pytest.raises(ConfigError, match=r"needs 3 GPU\(s\), this machine has 2"):
        modes.check_devices(_cfg("split", rollout_replicas=2))


@pytest.mark.parametrize("mode,device,gpus,transport", [
    ("cpu", "auto", False, "object_store"), ("cpu", "cpu", False, "object_store"),
    ("colocated", "auto", True, "ipc"), ("colocated", "cpu", False, "ipc"),
    ("split", "auto", True, "collective"), ("split", "cpu", False, "collective")])
def test_each_mode_says_whether_it_uses_gpus_and_how_states_travel(mode, device, gpus, transport):
    cfg = _cfg(mode, device=device)
    assert (modes.uses_gpus(cfg), modes.hidden_transport(cfg)) == (gpus, transport)


def test_sglang_needs_a_gpu_mode():
    cfg = _cfg("colocated", device="cpu")
    cfg = dataclasses.replace(cfg, rollout=dataclasses.replace(cfg.rollout, engine="sglang"))
    with pytest.raises(ConfigError, match="rollout.engine=sglang needs a GPU mode"):
        modes.check_devices(cfg)


def test_overlap_needs_split_mode():
    with pytest.raises(ConfigError, match="run.overlap=true needs run.mode=split"):
        _cfg("colocated", overlap=True)
    assert _cfg("split", overlap=True).run.overlap
