"""Modes -> placement: bundles, strategies and per-actor shares (no Ray needed); what each mode needs, device checks;
what every actor's process sets up: NCCL's cuMem setting (sglang's), and the GPU Ray assigned it."""

import ast
import dataclasses
import importlib.util
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import ray
import torch

from opd.actors import common
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


@pytest.mark.parametrize("mode,device", [("cpu", "auto"), ("split", "cpu")])
def test_sglang_needs_a_gpu_mode_or_colocated_on_the_cpu(mode, device):
    cfg = _cfg(mode, device=device)
    cfg = dataclasses.replace(cfg, rollout=dataclasses.replace(cfg.rollout, engine="sglang"))
    with pytest.raises(ConfigError, match="rollout.engine=sglang needs --mode colocated or split on GPUs"):
        modes.check_devices(cfg)


def test_sglang_on_the_cpu_names_the_sgl_kernel_stand_in(monkeypatch):
    """colocated with run.device=cpu runs sglang's CPU engine (tests/test_sglang_loop.py), which imports
    sgl_kernel: not on PyPI for a CPU, so the tests' stand-in must be on the path."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "sgl_kernel" else object() if name == "sglang" else real(name, *a))
    cfg = _cfg("colocated", device="cpu")
    cfg = dataclasses.replace(cfg, rollout=dataclasses.replace(cfg.rollout, engine="sglang"))
    with pytest.raises(ConfigError, match="needs an importable sgl_kernel.*tests/sglang_cpu"):
        modes.check_devices(cfg)


def test_overlap_needs_split_mode():
    with pytest.raises(ConfigError, match="run.overlap=true needs run.mode=split"):
        _cfg("colocated", overlap=True)
    assert _cfg("split", overlap=True).run.overlap


def _sglang_cumem_default() -> str:
    """The NCCL_CUMEM_ENABLE that sglang's `_set_envs_and_config` sets when it is unset, read from its source (it
    does not import without a GPU): the assignment's expression evaluated on the engine's default arguments (the
    constant defaults of the fields in sglang/srt/arg_groups/fields/) and the locals it reads."""
    spec = importlib.util.find_spec("sglang")
    if spec is None or spec.origin is None or not (Path(spec.origin).parent / "srt/entrypoints/engine.py").exists():
        pytest.skip("sglang's source is not installed (pip install --no-deps sglang==0.5.23 puts it here)")
    root = Path(spec.origin).parent
    defaults = {node.target.id: node.value.value for file in sorted((root / "srt/arg_groups/fields").glob("*.py"))
                for node in ast.walk(ast.parse(file.read_text())) if isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name) and isinstance(node.value, ast.Constant)}
    fn = next(n for n in ast.walk(ast.parse((root / "srt/entrypoints/engine.py").read_text()))
              if isinstance(n, ast.FunctionDef) and n.name == "_set_envs_and_config")
    sets = [n.value for n in ast.walk(fn) if isinstance(n, ast.Assign) and any(
        isinstance(t, ast.Subscript) and isinstance(t.slice, ast.Constant) and t.slice.value == "NCCL_CUMEM_ENABLE"
        for t in n.targets)]
    assert len(sets) == 1, "sglang sets NCCL_CUMEM_ENABLE in one assignment: read this test against its source again"
    scope = {"cfg": SimpleNamespace(**defaults), "str": str, "int": int}
    reads = {n.id for n in ast.walk(sets[0]) if isinstance(n, ast.Name)} - set(scope)
    for stmt in fn.body:  # e.g. kv_shard_symmetric_scratch = cfg.enable_kv_cache_sharding and ...
        if isinstance(stmt, ast.Assign) and isinstance(stmt.targets[0], ast.Name) and stmt.targets[0].id in reads:
            scope[stmt.targets[0].id] = eval(compile(ast.Expression(stmt.value), "sglang", "eval"), scope)
    return eval(compile(ast.Expression(sets[0]), "sglang", "eval"), scope)


def test_every_actor_starts_with_sglangs_nccl_cumem_setting(monkeypatch):
    """The learner joins sglang's weight group: its NCCL must use the cuMem setting sglang's processes use. Every
    actor's first step is init_process (before any communicator), which sets sglang's value and keeps a user's."""
    assert common.NCCL_CUMEM_ENABLE == _sglang_cumem_default()
    threads = torch.get_num_threads()  # init_process sets this process's torch threads: put them back
    try:
        for name in ("NCCL_CUMEM_ENABLE", "TOKENIZERS_PARALLELISM"):
            monkeypatch.delenv(name, raising=False)
        common.init_process(preset("tiny_cpu"))
        assert os.environ["NCCL_CUMEM_ENABLE"] == common.NCCL_CUMEM_ENABLE
        monkeypatch.setenv("NCCL_CUMEM_ENABLE", "1")
        common.init_process(preset("tiny_cpu"))
        assert os.environ["NCCL_CUMEM_ENABLE"] == "1"  # the user's setting wins (sglang keeps it too)
    finally:
        torch.set_num_threads(threads)
    root = Path(common.__file__).parent
    for module, cls in (("learner", "LearnerActor"), ("teacher", "TeacherActor"), ("rollout", "RolloutActor")):
        tree = ast.parse((root / f"{module}.py").read_text())
        init = next(f for c in ast.walk(tree) if isinstance(c, ast.ClassDef) and c.name == cls
                    for f in c.body if isinstance(f, ast.FunctionDef) and f.name == "__init__")
        first = next(s for s in init.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant)))
        assert ast.unparse(first) == "init_process(cfg)", f"{cls}.__init__ starts with init_process(cfg)"


def _set_env(monkeypatch, values: dict) -> None:
    for name, value in values.items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)


@pytest.mark.parametrize("noset,visible,ids,want", [
    (None, "3", [3], 0),  # Ray set CUDA_VISIBLE_DEVICES to the actor's GPU: cuda:0
    ("1", None, [2], 2),  # every GPU visible: the assigned id is the index
    ("true", "4,5,6,7", ["6"], 2),  # the node's own list: the id's place in it
    ("0", "1", [1], 0),  # Ray reads only 1 and true as set
])
def test_the_actor_device_is_the_gpu_ray_assigned(noset, visible, ids, want, monkeypatch):
    _set_env(monkeypatch, {common.NOSET_CUDA_ENV: noset, "CUDA_VISIBLE_DEVICES": visible})
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: ids)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8 if visible is None else len(visible.split(",")))
    assert common.cuda_index() == want


@pytest.mark.parametrize("noset,visible,ids,problem", [
    ("1", None, [], "Ray assigned this actor no GPU"),
    (None, "0", [], "Ray assigned this actor no GPU"),
    (None, "0", [1], "sees CUDA_VISIBLE_DEVICES=0, Ray assigned it GPU 1"),
    ("0", None, [2], "sees CUDA_VISIBLE_DEVICES=unset, Ray assigned it GPU 2"),  # "0": Ray sets the variable
    ("1", "0,1", ["3"], "Ray assigned GPU 3, which CUDA_VISIBLE_DEVICES=0,1 does not list"),
    ("1", None, [5], r"Ray assigned GPU 5 \(cuda:5\), but this actor sees 2 GPU\(s\)"),
])
def test_a_device_that_is_not_the_one_ray_assigned_is_one_error(noset, visible, ids, problem, monkeypatch):
    _set_env(monkeypatch, {common.NOSET_CUDA_ENV: noset, "CUDA_VISIBLE_DEVICES": visible})
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: ids)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(RuntimeError, match=problem) as e:
        common.cuda_index()
    assert "\n" not in str(e.value)


def test_a_ray_actor_computes_on_its_gpu_and_makes_it_current(monkeypatch):
    _set_env(monkeypatch, {common.NOSET_CUDA_ENV: "1", "CUDA_VISIBLE_DEVICES": None})
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [3])
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    current = []
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "get_runtime_context", lambda: SimpleNamespace(get_actor_id=lambda: "an actor"))
    assert common.actor_device(_cfg("split")) == torch.device("cuda", 3) and current == [3]
    assert common.actor_device(_cfg("split", device="cpu")) == torch.device("cpu")
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # in-process actors (tests, scripts): nothing assigned
    assert common.actor_device(_cfg("split")) == torch.device("cuda", 0) and current == [3]


def test_joining_the_collective_groups_keeps_the_actors_gpu(monkeypatch):
    """split mode on GPUs: joining the groups must not move the actor off the GPU actor_device made current (with
    RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES that is not cuda:0), or NCCL would work on another GPU."""
    from opd.transport import groups

    calls = []
    monkeypatch.setattr(torch.distributed, "is_nccl_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: calls.append(("set_device", index)))
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend, **kw: calls.append(("init", backend)))
    groups.join(groups.GroupSpec({}, world_size=1, backend="nccl", init_method="tcp://127.0.0.1:1"), 0)
    assert calls == [("init", "nccl")]
