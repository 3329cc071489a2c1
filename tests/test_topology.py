"""Modes -> placement: bundles, strategies and per-actor shares (no Ray needed)."""

import pytest

from cluster.resources import ConfigError, placement_plan


def _gpus_per_bundle(plan):
    used = [0.0] * len(plan.bundles)
    for place in plan.actors.values():
        used[place.bundle] += place.num_gpus
    return used


def test_cpu_mode_packs_three_cpu_actors_on_one_node():
    plan = placement_plan("cpu", 0.5)
    assert plan.strategy == "STRICT_PACK" and all("GPU" not in b for b in plan.bundles)
    assert {p.bundle for p in plan.actors.values()} == {0, 1, 2} and all(p.num_gpus == 0 for p in plan.actors.values())


def test_colocated_shares_one_gpu_between_all_actors():
    plan = placement_plan("colocated", 0.5)
    assert plan.bundles == ({"CPU": 1.5, "GPU": 1},) and plan.strategy == "STRICT_PACK"
    assert {p.bundle for p in plan.actors.values()} == {0}  # one device for all: CUDA IPC works
    assert 0 < _gpus_per_bundle(plan)[0] <= 1 and all(0 < p.num_gpus < 1 for p in plan.actors.values())


def test_split_puts_the_learner_alone_on_a_gpu():
    plan = placement_plan("split", 1.0)
    assert [b.get("GPU") for b in plan.bundles] == [1, 1]
    assert plan.actors["learner"].bundle != plan.actors["rollout"].bundle == plan.actors["teacher"].bundle
    assert _gpus_per_bundle(plan) == [1.0, 1.0]
    for place in plan.actors.values():  # each actor's CPU fits its bundle's
        assert place.num_cpus <= plan.bundles[place.bundle]["CPU"]


def test_unknown_mode():
    with pytest.raises(ConfigError, match="run.mode='tpu' is unknown"):
        placement_plan("tpu", 1.0)


def test_colocated_plumbing_on_cpu_asks_for_no_gpu():
    plan = placement_plan("colocated", 0.5, use_gpus=False)
    assert all("GPU" not in b for b in plan.bundles) and all(p.num_gpus == 0 for p in plan.actors.values())
