"""The learner's logged loss and its update, against the materialised reference on a real batch."""

import torch
from transformers import AutoModelForCausalLM

from opd.actors.learner import LearnerActor
from opd.actors.rollout import RolloutActor
from opd.actors.teacher import TeacherActor
from conftest import whole
from opd.kernels.reference import distill_loss, sampled_rkl_loss
from opd.overrides import override
from opd.presets import tiny_cpu


def test_learner_loss_equals_reference_and_the_engine_sees_the_step(root, tmp_path):
    cfg = override(override(tiny_cpu(), "loss.kind=jsd"), "loss.temperature=1.5")
    learner, teacher, rollout = LearnerActor(cfg), TeacherActor(cfg), RolloutActor(cfg)
    try:
        learner.set_teacher_head(teacher.output_head())
        rollout.load_weights(learner.export_weights())
        batch = rollout.generate([[3, 4, 14, 5, 6, 15]] * 2 + [[13, 12, 14, 4, 4, 15]], seed=0)
        # A saved batch: what crosses the actor boundary survives a round trip through a file.
        torch.save({"batch": batch, "scores": list(teacher.score(batch))}, tmp_path / "batch.pt")
        saved = torch.load(tmp_path / "batch.pt", weights_only=False)
        batch, scores = saved["batch"].check(), saved["scores"]

        # Reference: a fresh copy of the student, materialised logits, autograd.
        student = AutoModelForCausalLM.from_pretrained(root / "assets/toy/student", dtype=torch.float32)
        ids, mask, pos = batch.padded(learner.pad_id)
        h_s = student.model(input_ids=ids, attention_mask=mask).last_hidden_state.flatten(0, 1)[pos]
        tmodel = AutoModelForCausalLM.from_pretrained(root / "assets/toy/teacher", dtype=torch.float32)
        h_t = tmodel.model(input_ids=ids, attention_mask=mask).last_hidden_state.flatten(0, 1)[pos]
        n = batch.num_response_tokens
        want = distill_loss(h_s, student.lm_head.weight, h_t, tmodel.lm_head.weight, torch.ones(n), kind="jsd",
                            beta=0.5, temperature=1.5, num_tokens=n)

        before = rollout.logits(ids).clone()
        metrics = learner.train_step(batch, scores)
        assert abs(metrics["loss"] - float(want.detach())) < 1e-5, metrics["loss"]
        # the optimizer step frees the gradients: the rollout and teacher phases do not hold them
        assert all(p.grad is None for p in learner.student.parameters())
        assert metrics["logprob/learner_minus_rollout/absmax"] < 1e-4  # sampler and learner agree
        # The optimizer step reached the engine with no transfer: same logits as the learner's model now.
        after = rollout.logits(ids)
        assert not torch.allclose(before, after)
        with torch.no_grad():
            assert torch.allclose(after, learner.model(input_ids=ids).logits, atol=1e-6)
    finally:
        learner.shutdown()


def test_sampled_rkl_learner_matches_reference(root):
    cfg = override(tiny_cpu(), "loss.kind=sampled_rkl")
    learner, teacher, rollout = LearnerActor(cfg), TeacherActor(cfg), RolloutActor(cfg)
    try:
        learner.set_teacher_head(teacher.output_head())
        rollout.load_weights(learner.export_weights())
        batch = rollout.generate([[3, 4, 14, 5, 6, 15], [13, 12, 14, 4, 4, 15]], seed=1)
        scores = list(teacher.score(batch))
        assert all(s.hidden_states is None for s in scores)  # only the sampled tokens' log-probs cross the boundary
        ids, mask, pos = batch.padded(learner.pad_id)
        tmodel = AutoModelForCausalLM.from_pretrained(root / "assets/toy/teacher", dtype=torch.float32)
        with torch.no_grad():
            t_logp = torch.log_softmax(tmodel(input_ids=ids, attention_mask=mask).logits.flatten(0, 1)[pos], -1)
        assert torch.allclose(whole(scores, batch, "token_logprobs"), t_logp.gather(1, batch.response_ids[:, None]).squeeze(1),
                              atol=1e-5)
        student = AutoModelForCausalLM.from_pretrained(root / "assets/toy/student", dtype=torch.float32)
        h_s = student.model(input_ids=ids, attention_mask=mask).last_hidden_state.flatten(0, 1)[pos]
        n = batch.num_response_tokens
        want = sampled_rkl_loss(h_s, student.lm_head.weight, batch.response_ids, whole(scores, batch, "token_logprobs"),
                                batch.logprobs, torch.ones(n), num_tokens=n)
        metrics = learner.train_step(batch, scores)
        assert abs(metrics["loss"] - float(want.detach())) < 1e-5
        assert metrics["logprob/learner_minus_rollout/absmax"] < 1e-4
        assert abs(metrics["is_ratio/mean"] - 1) < 1e-4 and metrics["is_ratio/clipped_fraction"] == 0
    finally:
        learner.shutdown()
