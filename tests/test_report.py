"""report.html from a run directory: every section, the curves, the summary's numbers, the config; and the `opd`
console script's commands."""

import json
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml

from opd import report
from opd.configfile import merge
from opd.overrides import override
from opd.presets import tiny_cpu


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.text, self.pre, self._in_pre = [], [], "", False

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self._in_pre = tag == "pre"

    def handle_endtag(self, tag):
        self._in_pre = self._in_pre and tag != "pre"

    def handle_data(self, data):
        self.text.append(data)
        if self._in_pre:
            self.pre += data


@pytest.fixture
def run_dir(tmp_path):
    cfg = override(override(tiny_cpu(), "train.steps=4"), "loss.kind=jsd")
    d = tmp_path / "run"
    (d / "checkpoints" / "step_4").mkdir(parents=True)
    (d / "checkpoints" / "step_4" / "run_state.json").write_text(json.dumps({"step": 4, "policy_version": 4}))
    (d / "config.json").write_text(json.dumps(cfg.to_dict()))
    (d / "data_counts.json").write_text(json.dumps({"train_prompts": 100, "eval_prompts": 20}))
    steps = [{"step": s, "loss": 1.0 / s, "kl/reverse/mean": 2.0 / s, "kl/forward/mean": 1.5 / s,
              "response/length/mean": 5.0 + s, "response/length/max": 8.0 + s, "timing/rollout_s": 0.1 * s,
              "timing/teacher_s": 0.2, "timing/train_s": 0.3, "timing/overlap_wait_s": 0.0, "timing/sync_s": 0.01,
              "timing/step_s": 0.51 + 0.1 * s} for s in range(1, 5)]
    evals = [{"step": s, "eval/kl/reverse/mean": 3.0 / (s + 1), "eval/kl/forward/mean": 0.7 / (s + 1),
              "eval/accuracy/student": 0.1 + 0.2 * s, "eval/accuracy/teacher": 0.95} for s in (0, 2, 4)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in steps))
    (d / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in evals))
    return d, cfg


def test_report_shows_the_run(run_dir):
    d, cfg = run_dir
    page = _Page()
    page.feed(report.write(d).read_text())
    text = " ".join(page.text)
    for heading in ("Summary", "Learning curves", "Checkpoints", "Data", "Config"):
        assert heading in text, heading
    assert page.tags.count("figure") == 5 and page.tags.count("svg") == 5  # one inline SVG per curve
    # the summary: first and last evaluation, as the driver prints them
    for value in ("10.0%", "90.0%", "95.0%", "3.0000", "0.6000", "0.7000", "0.1400"):
        assert value in text, value
    assert "4 of 4 steps done" in text and "step_4" in text and "train_prompts" in text
    assert merge(tiny_cpu(), yaml.safe_load(page.pre)) == cfg  # the config shown is the run's, whole


def test_opd_console_script(run_dir, tmp_path):
    d, _ = run_dir
    opd = str(Path(sys.executable).parent / "opd")
    (d / "report.html").unlink(missing_ok=True)
    out = subprocess.run([opd, "report", str(d)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0 and (d / "report.html").is_file(), out.stderr
    out = subprocess.run([opd, "report", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "not a run directory" in out.stderr
    out = subprocess.run([opd, "memory", "--preset", "tiny_cpu"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "learner" in out.stdout, out.stdout + out.stderr
    out = subprocess.run([opd, "train", "--preset", "smollm2_cpu", "--print-config"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and "assets/smollm2/student" in out.stdout
    out = subprocess.run([opd, "trian"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stderr.strip() == (
        "error: opd trian: no such command; use one of train, bench, report, memory, kernels-bench, side-by-side, "
        "doctor "
        "(opd --help)")
