"""The order `launch` creates the actors in, read without a cluster: Ray's calls in opd/cluster/topology.py
recorded by a stand-in. sglang sizes its KV cache from the GPU memory free at its start, so in every mode where it
shares a GPU (colocated; split, with its teacher) the engines must have started before another actor is created."""

from __future__ import annotations

import dataclasses
import types

import pytest

from opd.cluster import topology
from opd.presets import preset


class _Recorder:
    """Stands in for `ray` inside topology: `ray.remote(cls).options(...).remote(...)` logs ("create", name),
    `ray.get` on the engines' `weight_version` logs ("await", "RolloutActor")."""

    def __init__(self):
        self.log = []
        self.exceptions = types.SimpleNamespace(GetTimeoutError=TimeoutError)

    def remote(self, cls=None, **_):
        recorder = self

        class Handle:
            name = getattr(cls, "__name__", "task")

            def __getattr__(self, method):
                return types.SimpleNamespace(remote=lambda *a, **k: (self.name, method))

        class Options:
            def options(self, **_):
                return self

            def remote(self, *args, **kwargs):
                recorder.log.append(("create", Handle.name))
                return Handle()

        return Options()

    def get(self, refs, timeout=None):
        for ref in refs if isinstance(refs, list) else [refs]:
            if isinstance(ref, tuple) and ref[1] == "weight_version":
                self.log.append(("await", ref[0]))
        return ("127.0.0.1", 1) if not isinstance(refs, list) else [None] * len(refs)


def _launch(monkeypatch, mode: str, engine: str) -> list:
    recorder = _Recorder()
    monkeypatch.setattr(topology, "ray", recorder)
    monkeypatch.setattr(topology, "placement_group", lambda *a, **k: types.SimpleNamespace(ready=lambda: None))
    monkeypatch.setattr(topology, "PlacementGroupSchedulingStrategy", lambda **k: None)
    monkeypatch.setattr(topology, "Actors", lambda *a, **k: types.SimpleNamespace())
    monkeypatch.setattr(topology, "_join_groups", lambda cfg, actors: None)
    cfg = preset("tiny_cpu")
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, mode=mode, device="cpu"),
                              rollout=dataclasses.replace(cfg.rollout, engine=engine))
    topology.launch(cfg)
    return recorder.log


@pytest.mark.parametrize("mode,engine", [("colocated", "hf"), ("colocated", "sglang"), ("split", "sglang")])
def test_the_engines_start_before_the_teacher_and_learner_are_created(monkeypatch, mode, engine):
    log = _launch(monkeypatch, mode, engine)
    creates = [name for what, name in log if what == "create"]
    assert {"TeacherActor", "LearnerActor"} <= set(creates)
    awaited = log.index(("await", "RolloutActor"))
    assert all(log.index(("create", other)) > awaited for other in ("TeacherActor", "LearnerActor")), log


def test_split_mode_with_hf_engines_starts_everything_at_once(monkeypatch):
    """Nothing to wait for: the hf engine reserves no memory at its start."""
    assert ("await", "RolloutActor") not in _launch(monkeypatch, "split", "hf")
