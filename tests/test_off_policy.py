"""Off-policy samples beside the student's (rollout.student_fraction, rollout.off_policy_source): where each
response comes from, the loss and the per-source metrics against a materialised reference, the refusals, and
short runs under Ray."""

import json
import subprocess
import sys

import pytest
import torch

from opd.actors.learner import LearnerActor
from opd.actors.rollout import RolloutActor
from opd.actors.teacher import TeacherActor
from conftest import toy_states
from opd.kernels.reference import distill_loss
from opd import toy
from opd.batch import DATASET, STUDENT, TEACHER, RolloutBatch
from opd.config import ConfigError
from opd.overrides import override
from opd.presets import tiny_cpu
from opd.metrics import read_jsonl
from opd.models import load_tokenizer
from opd.prompt_sets import build_prompt_set, gold_batch, student_ids
from test_bad_input import _preflight_error, _refused
from test_data_parallel import readme_command


def _cfg(*settings):
    cfg = tiny_cpu()
    for s in settings:
        cfg = override(cfg, s)
    return cfg


@pytest.fixture(scope="module")
def prompts(root):
    tok = load_tokenizer(str(root / "assets/toy/student"))
    return build_prompt_set(tiny_cpu().data, 0, tok, tok).train[:24], tok


def test_the_teacher_answers_its_share_and_the_loss_and_metrics_equal_the_reference(root, prompts):
    """A step of 8 student samples and 16 teacher samples: the teacher's responses are its own (its accuracy, not
    the student's), the loss equals the materialised reverse KL over all of them, each source's KL equals the
    reference on its tokens, and the log-prob canary looks at the student's samples only (the teacher's
    log-probs are the teacher's, far from the student's)."""
    train, tok = prompts
    cfg = _cfg("rollout.student_fraction=0.25", "rollout.off_policy_source=teacher", "rollout.max_new_tokens=6")
    learner, teacher, rollout = LearnerActor(cfg), TeacherActor(cfg), RolloutActor(cfg)
    try:
        learner.set_teacher_head(teacher.output_head())
        rollout.load_weights(learner.export_weights())
        mine = rollout.generate(student_ids(train[:8]), seed=0)
        theirs = teacher.sample(student_ids(train[8:]), None, seed=1)
        assert theirs.policy_version == -1 and theirs.source.tolist() == [TEACHER] * 16
        assert theirs.prompts() == student_ids(train[8:])  # the student's prompts: what the learner trains on

        def accuracy(batch, offset):
            answers = [tok.decode(r) for r in batch.responses()]
            return sum(toy.is_correct(train[offset + i].text, a) for i, a in zip(batch.prompt_index.tolist(), answers)
                       ) / batch.num_samples

        assert accuracy(theirs, 8) >= 0.9 > accuracy(rollout.generate(student_ids(train[8:]), seed=1), 8)
        theirs.prompt_index += 8
        batch = RolloutBatch.concat([mine, theirs]).planned(cfg.learner.micro_batch_tokens)  # as the merge does
        assert batch.policy_version == mine.policy_version and batch.on_policy
        scores = list(teacher.score(batch))

        student, tmodel, h_s, h_t = toy_states(root, batch, learner.pad_id)
        n = batch.num_response_tokens
        want = distill_loss(h_s, student.lm_head.weight, h_t, tmodel.lm_head.weight, torch.ones(n), kind="rkl",
                            beta=0.5, temperature=1.0, num_tokens=n)
        with torch.no_grad():  # per-token reverse KL, materialised in float64
            logp_s = torch.log_softmax((h_s @ student.lm_head.weight.T).double(), -1)
            logp_t = torch.log_softmax((h_t @ tmodel.lm_head.weight.T).double(), -1)
            rkl = (logp_s.exp() * (logp_s - logp_t)).sum(-1)
        source = batch.token_source()
        metrics = learner.train_step(batch, scores)
        assert abs(metrics["loss"] - float(want.detach())) < 1e-5
        assert metrics["kl/reverse/mean"] == pytest.approx(float(rkl.mean()), abs=1e-5)
        for name, s in (("student", STUDENT), ("teacher", TEACHER)):
            assert metrics[f"source/{name}/kl/reverse/mean"] == pytest.approx(float(rkl[source == s].mean()), abs=1e-5)
        assert metrics["source/student/samples"] == 8 and metrics["source/teacher/samples"] == 16
        assert metrics["logprob/learner_minus_rollout/absmax"] < 1e-4
        # over every token the canary would see the teacher's sampling log-probs, far from the student's
        student_logprobs = logp_s.gather(1, batch.response_ids[:, None])[:, 0]
        assert float((batch.logprobs - student_logprobs)[source == TEACHER].abs().max()) > 1e-2
    finally:
        learner.shutdown()


def test_gold_answers_are_the_datasets(prompts):
    train, tok = prompts
    batch = gold_batch(train[:3], tok, num_samples=2, max_new_tokens=4)
    assert batch.source.tolist() == [DATASET] * 6 and batch.prompt_index.tolist() == [0, 0, 1, 1, 2, 2]
    want = [tok(p.answer, add_special_tokens=False).input_ids for p in train[:3]]
    assert all(w[-1] == tok.eos_token_id for w in want)  # "052|": the answer ends with end-of-sequence
    assert batch.responses() == [w for w in want for _ in range(2)] and batch.finish_reasons == ["stop"] * 6
    cut = gold_batch(train[:1], tok, num_samples=1, max_new_tokens=2)
    assert cut.responses() == [want[0][:2]] and cut.finish_reasons == ["length"]
    assert float(batch.logprobs.abs().sum()) == 0


@pytest.mark.parametrize("setting,needle", [
    ("rollout.student_fraction=1.5", "rollout.student_fraction=1.5 must be in [0, 1]"),
    ("rollout.student_fraction=-0.1", "rollout.student_fraction=-0.1 must be in [0, 1]"),
    ("rollout.off_policy_source=web", "rollout.off_policy_source='web' is unknown"),
])
def test_bad_settings_are_refused(setting, needle):
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        override(tiny_cpu(), setting)


def test_the_benchmark_refuses_off_policy_settings(root):
    from opd.programs.bench import prepare

    for setting in ("rollout.student_fraction=0.5", "data.gold_prefix_field=answer"):
        with pytest.raises(ConfigError, match="--bench times on-policy steps"):
            prepare(override(tiny_cpu(), setting))


def test_sampled_rkl_needs_the_students_samples():
    with pytest.raises(ConfigError, match="loss.kind=sampled_rkl needs the student's own samples"):
        _cfg("rollout.student_fraction=0.5", "loss.kind=sampled_rkl")


def test_a_dataset_source_without_answers_is_refused_before_ray(root, tmp_path):
    data = tmp_path / "questions.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i:02d}+{i:02d}="}) + "\n" for i in range(40)))
    settings = ["--set", f"data.source={data}", "--set", "data.num_eval_prompts=8", "--set", "data.chat_template=false",
                "--set", "rollout.student_fraction=0.5", "--set", "rollout.off_policy_source=dataset",
                "--set", f"run.out_dir={tmp_path / 'runs'}"]
    message = _preflight_error(*settings)
    assert "needs a gold answer for every training prompt; 32 of 32" in message and "questions.jsonl" in message
    assert "rollout.off_policy_source=dataset needs a gold answer" in _refused(root, *settings)
    assert not (tmp_path / "runs").exists()  # refused before anything was written


# ---------------------------------------------------------------- end to end under Ray

COMMON = ["train.steps=2", "train.eval_every=0", "train.prompts_per_step=8", "data.num_eval_prompts=16",
          "run.progress=false", "run.cpus_per_actor=0.25"]


def _run(root, out, readme_start: str) -> list[dict]:
    """docs/configuration.md's command that starts with `readme_start`, as typed, cut to two steps of 8 prompts."""
    command = readme_command(root, "docs/configuration.md", readme_start)
    args = command[1:] + [a for s in COMMON + [f"run.out_dir={out}"] for a in ("--set", s)]
    done = subprocess.run([sys.executable, *args], cwd=root, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    name = command[command.index("--set", len(command) - 2) + 1].split("=")[1]  # the run.name it ends with
    return read_jsonl(out / name / "metrics.jsonl")


def test_runs_with_teacher_and_dataset_samples(root, tmp_path):
    """docs/configuration.md's two commands. λ = 0 with the teacher: every sample is the teacher's (no policy
    version, no canary); λ = 0.5 with the dataset: half the prompts answered by their gold answers."""
    teacher_only = _run(root, tmp_path, ".venv/bin/python driver.py --set rollout.student_fraction=0 ")
    for row in teacher_only:
        assert row["source/teacher/samples"] == 8 and row["source/student/samples"] == 0
        assert row["logprob/learner_minus_rollout/absmax"] != row["logprob/learner_minus_rollout/absmax"]  # nan
        assert row["kl/reverse/mean"] == pytest.approx(row["source/teacher/kl/reverse/mean"], rel=1e-6)
    assert [r["policy/version"] for r in teacher_only] == [1, 2]
    mixed = _run(root, tmp_path, ".venv/bin/python driver.py --set rollout.student_fraction=0.5 ")
    for row in mixed:
        assert row["source/dataset/samples"] == 4 and row["source/student/samples"] == 4
        assert row["logprob/learner_minus_rollout/absmax"] < 1e-4
