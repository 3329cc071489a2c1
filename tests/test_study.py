"""The study (`python -m opd.programs.study`) end to end in its --quick form, and the running-sums task it adds."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from opd import chain, toy
from opd.metrics import read_jsonl
from opd.models import load_tokenizer


def test_running_sums_task():
    train, held_out = chain.problems("train"), chain.problems("eval")
    assert (len(train), len(held_out)) == (20_000, 500) and not {p for p, _ in train} & {p for p, _ in held_out}
    assert chain.problems("eval") == held_out  # deterministic
    prompt = "7+5+9+3+8+6="
    assert chain._answer((7, 5, 9, 3, 8, 6)) == "1221243238|"
    assert chain.is_correct(prompt, "1221243238|") and chain.is_correct(prompt, "1221243238")
    assert not chain.is_correct(prompt, "1221243239|") and not chain.is_correct(prompt, "12212432|")
    # one early slip: every later sum follows from it and is wrong against the truth
    assert chain.correct_prefix(prompt, "1222253339|") == 1 and chain.correct_prefix(prompt, "1221243238|") == 5
    with pytest.raises(ValueError):
        chain.is_correct("07+45=", "052|")


def test_running_sums_assets_teacher_strong_student_weak(root):
    tok = load_tokenizer(str(root / "assets/chain/teacher"))
    models = {side: AutoModelForCausalLM.from_pretrained(root / "assets/chain" / side, dtype=torch.float32)
              for side in ("teacher", "student")}
    accuracy = {side: toy.greedy_accuracy(m, tok, "eval", limit=200, task=chain.TASK) for side, m in models.items()}
    assert accuracy["teacher"] >= 0.95 and accuracy["student"] <= 0.2, accuracy


def test_quick_study_writes_the_plot_and_the_table(root, tmp_path):
    """`python -m opd.programs.study --quick` as typed: the PNG and the table, whose numbers are the runs' own records."""
    done = subprocess.run([sys.executable, "-m", "opd.programs.study", "--quick", "--out", str(tmp_path)], cwd=root,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    png = (tmp_path / "study.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    study, table = json.loads((tmp_path / "study.json").read_text()), (tmp_path / "study.md").read_text()
    assert [r["run"] for r in study["runs"]] == ["rkl", "rkl_teacher", "hybrid", "rkl", "rkl_teacher"]
    for r in study["runs"]:
        run_dir = tmp_path / "addition" / f"{r['run']}_s{r['seed']}"
        evals, steps = read_jsonl(run_dir / "eval.jsonl"), read_jsonl(run_dir / "metrics.jsonl")
        assert [c["accuracy"] for c in r["curve"]] == [e["eval/accuracy/student"] for e in evals]
        scored = sum(s["response/tokens/sum"] for s in steps)
        # the teacher's compute: the tokens it scored, and as many again that it generated when it sampled
        assert r["curve"][-1]["teacher_tokens"] == (2 * scored if r["run"] == "rkl_teacher" else scored)
        if r["run"] == "rkl_teacher":
            assert all(s["source/teacher/samples"] == 16 and s["source/student/samples"] == 0 for s in steps)
        if r["seed"] == 0:
            last = r["curve"][-1]
            assert f"| {r['label']} | {r['curve'][0]['accuracy']:.1%} → {last['accuracy']:.1%} |" in table
    assert "**Seeds 0, 1**" in table
