"""Config files (--config FILE.yaml / .json) and --print-config: round trips, precedence, refusals."""

import json
import subprocess
import sys

import pytest

from opd.config import ConfigError
from opd.configfile import load_tree, merge, to_yaml
from opd.overrides import override
from opd.presets import PRESETS, preset, tiny_cpu


@pytest.mark.parametrize("name", list(PRESETS))
def test_printed_yaml_reproduces_its_preset(tmp_path, name):
    path = tmp_path / "c.yaml"
    path.write_text(to_yaml(preset(name)))
    assert merge(tiny_cpu(), load_tree(path)) == preset(name)  # over another preset: every setting is in the file


@pytest.mark.parametrize("name", list(PRESETS))
def test_shipped_example_files_are_the_presets(root, name):
    assert merge(tiny_cpu(), load_tree(root / "configs" / f"{name}.yaml")) == preset(name)


def test_a_partial_file_merges_over_the_preset_and_under_set(tmp_path):
    path = tmp_path / "c.yaml"
    # YAML reads 1e-4 as a string: the field's type decides
    path.write_text("learner:\n  lr: 1e-4\n  adam_betas: [0.8, 0.9]\ntrain:\n  steps: 7\n")
    cfg = merge(tiny_cpu(), load_tree(path))
    assert cfg.learner.lr == 1e-4 and cfg.learner.adam_betas == (0.8, 0.9) and cfg.train.steps == 7
    assert cfg.loss == tiny_cpu().loss  # untouched sections keep the preset's values
    json_path = tmp_path / "c.json"
    json_path.write_text(json.dumps({"loss": {"kind": "jsd", "beta": 0.3}}))
    assert merge(cfg, load_tree(json_path)).loss.beta == 0.3
    from opd.programs.train import parse_args

    cfg = parse_args(["--config", str(path), "--set", "train.steps=9"])
    assert cfg.train.steps == 9 and cfg.learner.lr == 1e-4


@pytest.mark.parametrize("text, message", [
    ("learner:\n  lrr: 0.1\n", "unknown setting learner.lrr; did you mean learner.lr?"),
    ("trian:\n  steps: 3\n", "unknown section 'trian'; did you mean train?"),
    ("train:\n  steps: many\n", "train.steps='many': expected int"),
    ("train:\n  steps: 1.5\n", "train.steps=1.5: expected int"),
    ("loss:\n  kind: l2\n", "loss.kind"),
    ("- 1\n- 2\n", "expected a mapping of sections"),
    ("train: [1, 2\n", "not valid YAML"),
])
def test_bad_files_are_refused_with_one_line(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=None) as e:
        merge(tiny_cpu(), load_tree(path))
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_cli_prints_a_config_that_runs_back(root, tmp_path):
    printed = subprocess.run([sys.executable, "driver.py", "--preset", "smollm2_cpu", "--set", "train.steps=3",
                              "--print-config"], cwd=root, capture_output=True, text=True, timeout=120)
    assert printed.returncode == 0, printed.stderr
    path = tmp_path / "run.yaml"
    path.write_text(printed.stdout)
    assert merge(tiny_cpu(), load_tree(path)) == override(preset("smollm2_cpu"), "train.steps=3")
    bad = tmp_path / "bad.yaml"
    bad.write_text("learner:\n  lrr: 0.1\n")
    refused = subprocess.run([sys.executable, "driver.py", "--config", str(bad)], cwd=root, capture_output=True,
                             text=True, timeout=120)
    assert refused.returncode == 2 and refused.stderr.strip().splitlines() == [
        f"error: --config {bad}: unknown setting learner.lrr; did you mean learner.lr?"], refused.stderr
