"""The hybrid of SFT and on-policy distillation (data.gold_prefix_field): the gold prefix opens the response, the
student continues it; cross-entropy on the gold tokens and the divergence on the continuation, against a
materialised reference; the cross-entropy kernel against float64 at Qwen's vocabulary; the refusals; a run."""

import json

import pytest
import torch

from opd.actors.learner import LearnerActor
from opd.actors.rollout import RolloutActor
from opd.actors.teacher import TeacherActor
from conftest import toy_states
from opd.kernels.chunked import chunked_cross_entropy
from opd.kernels.reference import distill_loss
from opd.batch import RolloutBatch
from opd.config import ConfigError
from opd.overrides import override
from opd.presets import tiny_cpu
from opd.models import load_tokenizer
from opd.prompt_sets import build_prompt_set, student_ids
from test_bad_input import _preflight_error
from test_kernels import _report, under_bf16_autocast
from test_off_policy import _run

HYBRID = ["data.gold_prefix_max_tokens=2", "data.gold_prefix_field=answer", "loss.sft_weight=0.5"]


def _cfg(*settings):
    cfg = tiny_cpu()
    for s in settings:
        cfg = override(cfg, s)
    return cfg


def test_cross_entropy_kernel_against_float64_at_qwens_vocabulary():
    """Loss and both gradients of the chunked cross-entropy (weighted, valid-vocabulary cut) against
    torch.nn.functional.cross_entropy on materialised float64 logits, V = 151,936 rows (151,665 valid)."""
    torch.manual_seed(0)
    n, d, rows, valid = 24, 64, 151_936, 151_665
    h = torch.randn(n, d, requires_grad=True)
    w = (torch.randn(rows, d) * 0.3).requires_grad_()
    ids, weights = torch.randint(0, valid, (n,)), torch.rand(n)
    loss, nll = chunked_cross_entropy(h, w, ids, weights, num_tokens=40, valid_vocab=valid, chunk_size=7)
    loss.backward()
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    per_token = torch.nn.functional.cross_entropy(h64 @ w64[:valid].T, ids, reduction="none")
    want = (per_token * weights.double()).sum() / 40
    want.backward()
    assert abs(float(loss.detach()) - float(want.detach())) < 1e-5 * float(want.detach())
    assert abs(float(nll[0]) - float((per_token.detach() * weights.double()).sum())) < 1e-4
    assert torch.allclose(h.grad.double(), h64.grad, rtol=0, atol=1e-6)
    assert torch.allclose(w.grad.double(), w64.grad, rtol=0, atol=1e-6)
    assert float(w.grad[valid:].abs().max()) == 0  # rows past the tokenizer get no gradient


def test_cross_entropy_kernel_stays_fp32_under_bf16_autocast():
    """The hybrid's cross-entropy runs inside the learner's bf16 autocast (learner.compute_dtype=bfloat16): loss, nll
    and both gradients as without autocast, at 1e-6 (a bf16 GEMM moves them by ~1e-3 here)."""
    g = torch.Generator().manual_seed(5)
    h = torch.randn(37, 24, generator=g).requires_grad_()
    w = (torch.randn(1031, 24, generator=g) * 0.7).requires_grad_()
    ids, weights = torch.randint(0, 1000, (37,), generator=g), torch.rand(37, generator=g)

    def run():
        loss, nll = chunked_cross_entropy(h, w, ids, weights, num_tokens=40, valid_vocab=1000, chunk_size=7)
        return [loss, nll, *torch.autograd.grad(loss, [h, w])]

    want, got = run(), under_bf16_autocast(run)
    for name, a, b in zip(("loss", "nll", "grad h", "grad w"), got, want, strict=True):
        assert a.dtype == torch.float32, name
        _report(name, a.detach(), b.detach(), 1e-6)


def test_gold_prefix_moves_into_the_response():
    batch = RolloutBatch(prompt_ids=torch.tensor([1, 2, 3, 9, 4, 5, 8]), prompt_lens=torch.tensor([4, 3]),
                         response_ids=torch.tensor([6, 7, 0]), response_lens=torch.tensor([2, 1]),
                         logprobs=torch.tensor([-0.5, -0.25, -1.0]), prompt_index=torch.tensor([0, 1]),
                         finish_reasons=["stop", "length"], policy_version=3).check()
    moved = batch.with_gold_prefix([1, 0])
    assert moved.prompts() == [[1, 2, 3], [4, 5, 8]] and moved.responses() == [[9, 6, 7], [0]]
    assert moved.gold.tolist() == [True, False, False, False]
    assert moved.logprobs.tolist() == [0.0, -0.5, -0.25, -1.0] and moved.policy_version == 3


def test_hybrid_loss_equals_the_materialised_reference(root):
    """sft_weight x cross-entropy on the gold prefix ("05" of "052|") + reverse KL on the student's continuation,
    normalised by all response tokens, against materialised logits; the canary ignores the gold tokens."""
    cfg = _cfg(*HYBRID)
    tok = load_tokenizer(str(root / "assets/toy/student"))
    prompts = build_prompt_set(cfg.data, 0, tok, tok).train[:6]
    assert all(len(p.gold_prefix) == 2 and list(p.gold_prefix) == tok(p.answer).input_ids[:2] for p in prompts)
    learner, teacher, rollout = LearnerActor(cfg), TeacherActor(cfg), RolloutActor(cfg)
    try:
        learner.set_teacher_head(teacher.output_head())
        rollout.load_weights(learner.export_weights())
        batch = rollout.generate(student_ids(prompts), seed=0, prefixes=[list(p.gold_prefix) for p in prompts])
        assert batch.prompts() == student_ids(prompts)
        assert [r[:2] for r in batch.responses()] == [list(p.gold_prefix) for p in prompts]
        gold = batch.gold
        assert int(gold.sum()) == 12 and int((~gold).sum()) >= 6  # the student wrote at least one token each
        scores = list(teacher.score(batch))

        student, tmodel, h_s, h_t = toy_states(root, batch, learner.pad_id)
        n = batch.num_response_tokens
        divergence = distill_loss(h_s, student.lm_head.weight, h_t, tmodel.lm_head.weight, (~gold).float(),
                                  kind="rkl", beta=0.5, temperature=1.0, num_tokens=n)
        nll = torch.nn.functional.cross_entropy(h_s[gold] @ student.lm_head.weight.T, batch.response_ids[gold],
                                                reduction="sum")
        want = divergence + 0.5 * nll / n
        metrics = learner.train_step(batch, scores)
        assert abs(metrics["loss"] - float(want.detach())) < 1e-5
        assert metrics["sft/gold_tokens"] == 12
        assert metrics["sft/nll/mean"] == pytest.approx(float(nll.detach()) / 12, abs=1e-5)
        assert metrics["logprob/learner_minus_rollout/absmax"] < 1e-4
        assert abs(metrics["loss"] - float(divergence.detach())) > 1e-3  # the gold tokens' term is there
    finally:
        learner.shutdown()


@pytest.mark.parametrize("settings,needle", [
    (["data.gold_prefix_max_tokens=-1"], "data.gold_prefix_max_tokens=-1 must be >= 0"),
    (["loss.sft_weight=-1"], "loss.sft_weight=-1.0 must be >= 0"),
    ([*HYBRID, "rollout.student_fraction=0.5"], "the hybrid) trains on the student's continuations"),
])
def test_bad_hybrid_settings_are_refused(settings, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        _cfg(*settings)


def test_a_gold_prefix_field_missing_from_the_data_is_refused(tmp_path):
    data = tmp_path / "sums.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i:02d}+{i:02d}=", "answer": f"{2 * i:03d}"}) + "\n"
                            for i in range(40)))
    common = ["--set", f"data.source={data}", "--set", "data.num_eval_prompts=8", "--set", "data.chat_template=false",
              "--set", "data.gold_prefix_max_tokens=2", "--set", f"run.out_dir={tmp_path / 'runs'}"]
    message = _preflight_error(*common, "--set", "data.gold_prefix_field=solution")
    assert "data.gold_prefix_field='solution' is not a field of it (it has ['answer', 'prompt'])" in message
    toy = _preflight_error("--set", "data.gold_prefix_field=solution", "--set", f"run.out_dir={tmp_path / 'runs'}")
    assert "data.source=toy_addition has only its answers; use data.gold_prefix_field=answer" in toy
    assert not (tmp_path / "runs").exists()


def test_the_readme_hybrid_command(root, tmp_path):
    rows = _run(root, tmp_path, ".venv/bin/python driver.py --set data.gold_prefix_field=answer ")
    for row in rows:
        assert row["sft/gold_tokens"] == 16 and row["sft/nll/mean"] > 0  # 8 prompts x 2 gold tokens
        assert row["logprob/learner_minus_rollout/absmax"] < 1e-4
