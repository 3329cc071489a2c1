"""Token-budget micro-batches (issue 12): sequences packed into rows with position ids restarting per sequence,
the learner accumulating gradients over them, the teacher scoring them one row at a time. The step's loss and
gradients must be the whole batch's, computed here the old way (one padded forward, materialised logits)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from opd.actors.engines.hf import HFEngine
from opd.actors.learner import LearnerActor
from opd.actors.teacher import TeacherActor
from conftest import whole
from opd.kernels.reference import distill_loss, sampled_rkl_loss
from opd.batch import RolloutBatch, group_rows, pack_sequences, padding_waste
from opd.overrides import override
from opd.presets import tiny_cpu


@pytest.mark.parametrize("lengths, budget", [
    ([5, 3, 8, 2, 7, 1], 10), ([12, 3, 3], 10), ([4] * 9, 8), ([1], 1), ([9, 9, 9], 9), ([7, 2, 6, 3, 5, 4], 0)])
def test_pack_sequences_covers_each_sequence_once_within_the_budget(lengths, budget):
    bins = pack_sequences(lengths, budget)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(b == sorted(b) for b in bins)
    loads = [sum(lengths[i] for i in b) for b in bins]
    if budget == 0:
        assert len(bins) == 1
        return
    assert all(load <= budget or len(b) == 1 for load, b in zip(loads, bins, strict=True))
    assert len(bins) >= -(-sum(lengths) // budget)
    # balanced: no bin is emptier than another by more than one sequence could fill
    assert max(loads) - min(loads) <= max(lengths)
    assert pack_sequences(lengths, budget) == bins  # deterministic


def test_pack_sequences_balances_instead_of_leaving_a_remainder():
    bins = pack_sequences([4] * 10, 16)  # 40 tokens, budget 16: 3 bins of 16 / 12 / 12, not 16 / 16 / 8
    assert sorted(sum(4 for _ in b) for b in bins) == [12, 12, 16]


@pytest.mark.parametrize("budget", [0, 1, 6, 10, 25])
def test_group_rows_keep_groups_whole_within_the_budget(budget):
    lengths = [5, 3, 8, 2, 7, 1, 4, 6]
    groups = [tuple(g) for g in pack_sequences(lengths, 9)]  # the learner's plan (budget 9)
    rows = list(group_rows(groups, lengths, budget))
    assert sorted(i for row, _ in rows for i in row) == list(range(len(lengths)))  # every sample once
    assert sorted(g for _, done in rows for g in done) == list(range(len(groups)))  # every group completed once
    seen = set()
    for row, done in rows:
        assert budget == 0 or sum(lengths[i] for i in row) <= budget or len(row) == 1
        seen |= set(row)
        assert all(set(groups[g]) <= seen for g in done)  # a group completes only once all its samples are scored
    assert [g for _, done in rows for g in done] == sorted(g for _, done in rows for g in done)  # in plan order
    if budget == 0:
        assert len(rows) == 1


@pytest.fixture(scope="module")
def toy_batch(root) -> RolloutBatch:
    """Uneven prompts (4 to 6 tokens) and responses (stopped early or cut at 6 tokens) from the toy student."""
    tok = AutoTokenizer.from_pretrained(root / "assets/toy/student")
    engine = HFEngine.from_pretrained(str(root / "assets/toy/student"), eos_id=tok.eos_token_id,
                                      pad_id=tok.pad_token_id)
    prompts = [tok(p, add_special_tokens=False).input_ids for p in ["07+45=", "9+9=", "12+34=", "5+55=", "1+2="]]
    batch = engine.generate(prompts, num_samples=2, temperature=1.5, max_new_tokens=6, seed=3)
    lens = batch.response_lens.tolist()
    assert len(set(lens)) > 1 and len({len(p) for p in batch.prompts()}) > 1, "the test needs uneven lengths"
    return batch


def test_packed_rows_predict_the_response_tokens(toy_batch):
    for budget in (1, 20, 0):
        packs = toy_batch.micro_batches(budget)
        assert sorted(torch.cat([p.token_index for p in packs]).tolist()) == list(range(toy_batch.num_response_tokens))
        for p in packs:
            ids, pos = p.input_ids[0], p.position_ids[0]
            assert ids.numel() == sum(len(toy_batch.prompts()[i]) + len(toy_batch.responses()[i]) for i in p.samples)
            assert torch.equal(ids[p.positions + 1], toy_batch.response_ids[p.token_index])  # each predicts its token
            assert int((pos == 0).sum()) == len(p.samples)  # positions restart once per sequence
        assert padding_waste(packs, budget) >= 0.0
    assert padding_waste(toy_batch.micro_batches(0), 0) == 0.0


def _cfg(**sets):
    cfg = override(tiny_cpu(), "learner.max_grad_norm=1e9")  # no clipping: the raw gradients are compared
    for key, value in sets.items():
        cfg = override(cfg, f"{key.replace('__', '.')}={value}")
    return cfg


def _reference(root, batch, kind, temperature=1.0, beta=0.5):
    """The whole batch, padded, through a fresh student and teacher; materialised logits; autograd."""
    student = AutoModelForCausalLM.from_pretrained(root / "assets/toy/student", dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(root / "assets/toy/teacher", dtype=torch.float32)
    ids, mask, pos = batch.padded(0)
    h_s = student.model(input_ids=ids, attention_mask=mask).last_hidden_state.flatten(0, 1)[pos]
    n = batch.num_response_tokens
    with torch.no_grad():
        h_t = teacher.model(input_ids=ids, attention_mask=mask).last_hidden_state.flatten(0, 1)[pos]
        t_logp = torch.log_softmax(teacher.lm_head(h_t) / temperature, -1).gather(
            1, batch.response_ids[:, None]).squeeze(1)
    if kind == "sampled_rkl":
        loss = sampled_rkl_loss(h_s, student.lm_head.weight, batch.response_ids, t_logp, batch.logprobs,
                                torch.ones(n), num_tokens=n, temperature=temperature)
    else:
        loss = distill_loss(h_s, student.lm_head.weight, h_t, teacher.lm_head.weight, torch.ones(n), kind=kind,
                            beta=beta, temperature=temperature, num_tokens=n)
    loss.backward()
    return float(loss.detach()), {name: p.grad.clone() for name, p in student.named_parameters()}, h_t


def _step_grads(learner) -> dict[str, torch.Tensor]:
    """Filled with the gradients the optimizer step sees (the learner frees them right after it)."""
    seen = {}
    learner.optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: seen.update({n: p.grad.clone() for n, p in learner.model.named_parameters()}))
    return seen


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max()) / max(float(b.abs().max()), 1e-12)


@pytest.mark.parametrize("kind", ["rkl", "jsd", "sampled_rkl"])
def test_micro_batched_step_equals_the_whole_padded_batch(root, toy_batch, kind):
    temperature = 1.5 if kind == "sampled_rkl" else 1.3  # sampled_rkl: the sampler's temperature
    want_loss, want_grads, want_h_t = _reference(root, toy_batch, kind, temperature)
    lengths = [len(p) + len(r) for p, r in zip(toy_batch.prompts(), toy_batch.responses(), strict=True)]
    budgets = {"one sequence": 1, "three sequences": 3 * max(lengths), "whole batch": 0}
    for checkpointing in (False, True):
        for name, budget in budgets.items():
            cfg = _cfg(loss__temperature=temperature, rollout__temperature=1.5, loss__kind=kind,
                       learner__micro_batch_tokens=budget, teacher__micro_batch_tokens=budget,
                       learner__gradient_checkpointing=str(checkpointing).lower())
            learner, teacher = LearnerActor(cfg), TeacherActor(cfg)
            try:
                learner.set_teacher_head(teacher.output_head())
                batch = dataclasses.replace(toy_batch, policy_version=learner.version).planned(budget)
                scores = list(teacher.score(batch))
                if kind != "sampled_rkl":  # the teacher's packed states equal the padded ones
                    assert _relative(whole(scores, batch), want_h_t) < 1e-5, (name, "teacher hidden states")
                grads = _step_grads(learner)
                metrics = learner.train_step(batch, scores)
                where = (kind, name, f"checkpointing={checkpointing}")
                assert metrics["learner/micro_batches"] == len(batch.micro_batches(budget)), where
                assert abs(metrics["loss"] - want_loss) <= 1e-5 * abs(want_loss) + 1e-7, (where, metrics["loss"])
                assert set(grads) == set(want_grads), where
                for pname, grad in grads.items():
                    assert _relative(grad, want_grads[pname]) < 1e-5, (where, pname)
            finally:
                learner.shutdown()


def test_bf16_compute_is_finite_and_close_to_fp32(toy_batch):
    """learner.compute_dtype=bfloat16 on CPU: the student's matmuls in bf16 over fp32 master weights; the loss and
    the gradient norm within 1e-2 relative of the fp32 step, gradients kept in fp32."""
    results = {}
    for dtype in ("float32", "bfloat16"):
        cfg = _cfg(learner__compute_dtype=dtype, learner__micro_batch_tokens=20)
        learner, teacher = LearnerActor(cfg), TeacherActor(cfg)
        try:
            learner.set_teacher_head(teacher.output_head())
            batch = dataclasses.replace(toy_batch, policy_version=learner.version).planned(20)
            grads = _step_grads(learner)
            results[dtype] = learner.train_step(batch, list(teacher.score(batch)))
            assert grads and all(g.dtype == torch.float32 for g in grads.values())
            assert all(p.dtype == torch.float32 for p in learner.model.parameters())
        finally:
            learner.shutdown()
    fp32, bf16 = results["float32"], results["bfloat16"]
    for key in ("loss", "grad/norm", "kl/reverse/mean", "kl/forward/mean"):
        assert torch.isfinite(torch.tensor(bf16[key])), key
        assert abs(bf16[key] - fp32[key]) <= 1e-2 * abs(fp32[key]), (key, bf16[key], fp32[key])
    assert bf16["loss"] != fp32["loss"]  # the bf16 path really ran in bf16


@pytest.mark.parametrize("learner_budget, teacher_budget, replicas", [
    (1, 0, 1), (0, 1, 1), (20, 7, 2), (20, 60, 2), (1, 1, 3)])
def test_teacher_parts_follow_the_learners_plan(root, toy_batch, learner_budget, teacher_budget, replicas):
    """Each replica yields the parts of its micro-batches of the learner's plan (k % replicas), whatever the
    teacher's own budget; together they hold exactly the padded whole-batch states."""
    _, _, want_h_t = _reference(root, toy_batch, "rkl") if learner_budget == 1 and replicas == 1 else (0, 0, None)
    cfg = _cfg(learner__micro_batch_tokens=learner_budget, teacher__micro_batch_tokens=teacher_budget)
    teacher = TeacherActor(cfg)
    packs, planned = toy_batch.micro_batches(learner_budget), toy_batch.planned(learner_budget)
    parts = [list(teacher.score(planned, replica=i, replicas=replicas)) for i in range(replicas)]
    for i, mine in enumerate(parts):
        assert [p.micro_batch for p in mine] == list(range(i, len(packs), replicas))
    ordered = sorted((p for mine in parts for p in mine), key=lambda p: p.micro_batch)
    for part, packed in zip(ordered, packs, strict=True):
        assert torch.equal(part.token_index, packed.token_index)
    got = whole(ordered, toy_batch)
    one_row = whole(TeacherActor(_cfg()).score(toy_batch.planned(0)), toy_batch)  # the whole batch in one row
    assert _relative(got, one_row) < 1e-5
    if want_h_t is not None:
        assert _relative(got, want_h_t) < 1e-5


def test_learner_refuses_parts_of_another_plan(toy_batch):
    """The plan travels with the batch (RolloutBatch.planned): a batch without one is refused, and so are parts
    the teacher made for another plan of the same samples, or out of order."""
    teacher, learner = TeacherActor(_cfg()), LearnerActor(_cfg())
    try:
        learner.set_teacher_head(teacher.output_head())
        batch = dataclasses.replace(toy_batch, policy_version=learner.version)
        with pytest.raises(RuntimeError, match="no micro-batch plan"):
            next(teacher.score(batch))
        assert len(batch.planned(20).micro_batch_plan) > 1
        with pytest.raises(RuntimeError, match="teacher parts for the batch's"):
            learner.train_step(batch.planned(20), list(teacher.score(batch.planned(0))))
        parts = list(teacher.score(batch.planned(1)))
        with pytest.raises(RuntimeError, match="does not cover"):
            learner.train_step(batch.planned(1), parts[::-1])
    finally:
        learner.shutdown()
