"""cpu-mode weight transport: the engine's parameters are views of the learner's shared buffer."""

import pytest
import ray
import torch
from transformers import AutoModelForCausalLM

from opd.actors.learner import LearnerActor
from opd.actors.rollout import RolloutActor
from opd.overrides import override
from opd.presets import tiny_cpu
from opd.transport import weights


def _student(root):
    return AutoModelForCausalLM.from_pretrained(root / "assets/toy/student", dtype=torch.float32)


def test_attached_parameters_are_views_of_one_buffer(root):
    owner, engine = _student(root), _student(root)
    shared = weights.share_parameters(owner, "test-views")
    try:
        torch.nn.init.zeros_(engine.model.norm.weight)  # make the copies differ first
        weights.attach_parameters(engine, shared)
        assert torch.equal(engine.model.norm.weight, owner.model.norm.weight)
        storages = {p.untyped_storage().data_ptr() for p in engine.parameters()}
        assert len(storages) == 1  # every parameter is a window on the same mapping
        assert engine.lm_head.weight is engine.model.embed_tokens.weight  # still tied
        with torch.no_grad():
            owner.model.layers[0].mlp.up_proj.weight.add_(1.0)
        assert torch.equal(engine.model.layers[0].mlp.up_proj.weight, owner.model.layers[0].mlp.up_proj.weight)
    finally:
        weights.release(shared)


def test_mismatched_model_is_refused(root):
    owner = _student(root)
    shared = weights.share_parameters(owner, "test-mismatch")
    try:
        other = AutoModelForCausalLM.from_pretrained(root / "assets/toy/teacher", dtype=torch.float32)
        with pytest.raises(ValueError, match="shape"):
            weights.attach_parameters(other, shared)
    finally:
        weights.release(shared)


@pytest.fixture(scope="module")
def ray_local():
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def test_zero_copy_across_ray_actors(root, ray_local):
    """Change the learner's weights in its process; the engine's logits change in its process, and the
    only thing sent after the first handle is a version number."""
    cfg = tiny_cpu()
    learner = ray.remote(LearnerActor).options(num_cpus=0.5).remote(cfg)
    rollout = ray.remote(RolloutActor).options(num_cpus=0.5).remote(cfg)
    ids = torch.tensor([[3, 4, 14, 5, 6, 15, 3, 8]])
    assert ray.get(rollout.load_weights.remote(learner.export_weights.remote())) == 0
    before = ray.get(rollout.logits.remote(ids))
    ray.get(learner.__ray_call__.remote(lambda self: self.model.model.norm.weight.data.mul_(3.0)))
    after = ray.get(rollout.logits.remote(ids))  # no load_weights in between
    assert not torch.allclose(before, after)
    with torch.no_grad():
        want = ray.get(learner.__ray_call__.remote(lambda self: self.model(input_ids=ids).logits))
    assert torch.allclose(after, want, atol=1e-6)
    update = ray.get(learner.export_weights.remote())
    assert update.shared is None  # later syncs carry only the version
    ray.get(learner.shutdown.remote())


def test_colocated_plumbing_on_cpu_serving_copy_refreshed_at_sync(root):
    """colocated mode's weight path, run on the CPU: the engine maps the learner's serving buffer once (by
    handle); an optimizer step changes only the fp32 master until export_weights refreshes the buffer."""
    from opd.actors.teacher import TeacherActor

    cfg = override(override(tiny_cpu(), "run.mode=colocated"), "run.device=cpu")
    learner, rollout, teacher = LearnerActor(cfg), RolloutActor(cfg), TeacherActor(cfg)
    try:
        assert learner.shared is None and learner.serving is not None
        learner.set_teacher_head(teacher.output_head())
        first = learner.export_weights()
        assert first.serving is not None and rollout.load_weights(first) == 0
        ids = torch.tensor([[3, 4, 14, 5, 6, 15, 3, 8]])
        engine_params = {p.untyped_storage().data_ptr() for p in rollout.engine.model.parameters()}
        assert len(engine_params) == 1  # all views of one mapped buffer
        before = rollout.logits(ids).clone()
        batch = rollout.generate([[3, 4, 14, 5, 6, 15]] * 4, seed=0)
        metrics = learner.train_step(batch, list(teacher.score(batch)))
        assert metrics["logprob/learner_minus_rollout/absmax"] < 1e-4
        assert torch.equal(rollout.logits(ids), before)  # the step touched the master weights only
        update = learner.export_weights()
        assert update.serving is None and rollout.load_weights(update) == 1  # later syncs: refresh + version
        with torch.no_grad():
            assert torch.allclose(rollout.logits(ids), learner.model(input_ids=ids).logits, atol=1e-6)
    finally:
        learner.shutdown()
