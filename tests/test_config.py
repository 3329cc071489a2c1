"""Config tree: presets validate, overrides are typed, and bad input stops with one clear line before Ray."""

import json
import shutil
import subprocess
import sys

import pytest

from opd.config import ConfigError
from opd.overrides import override
from opd.presets import preset, tiny_cpu


def test_tiny_cpu_preset_and_overrides():
    cfg = tiny_cpu()
    assert preset("tiny_cpu") == cfg
    cfg = override(cfg, "learner.lr=3e-4")
    cfg = override(cfg, "loss.kind=jsd")
    cfg = override(cfg, "learner.adam_betas=0.8,0.95")
    cfg = override(cfg, "run.progress=false")
    assert (cfg.learner.lr, cfg.loss.kind, cfg.learner.adam_betas, cfg.run.progress) == (3e-4, "jsd", (0.8, 0.95), False)
    assert cfg.to_dict()["learner"]["lr"] == 3e-4


@pytest.mark.parametrize("assignment,needle", [
    ("loss.kind=kl", "loss.kind='kl' is unknown"),
    ("train.steps=0", "train.steps=0 must be > 0"),
    ("train.prompts_per_step=-4", "train.prompts_per_step=-4 must be > 0"),
    ("learner.lr=0", "learner.lr=0.0 must be > 0"),
    ("learner.lr=fast", "expected a value of type"),
    ("run.mode=tpu", "run.mode='tpu' is unknown"),
    ("learner.nope=1", "no such setting"),
    ("learner", "write it as section.field=value"),
    ("learner.micro_batch_tokens=-1", "learner.micro_batch_tokens=-1 must be >= 0"),
    ("teacher.micro_batch_tokens=-8", "teacher.micro_batch_tokens=-8 must be >= 0"),
    ("learner.compute_dtype=float16", "learner.compute_dtype='float16' is unknown"),
])
def test_bad_values_name_the_field(assignment, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        override(tiny_cpu(), assignment)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="preset 'big' is unknown"):
        preset("big")


@pytest.mark.parametrize("args,needle", [
    (["--set", "loss.kind=kl"], "loss.kind='kl' is unknown"),
    (["--preset", "nope"], "preset 'nope' is unknown"),
    (["--set", "train.steps=-1"], "train.steps=-1 must be > 0"),
    (["--set", "learner.lr=-1e-3"], "learner.lr=-0.001 must be > 0"),
    (["--set", "train.prompts_per_step=0"], "train.prompts_per_step=0 must be > 0"),
    (["--set", "model.student=/no/such/model"], "model.student=/no/such/model: no Hugging Face model folder"),
    (["--mode", "split"], "run.mode=split needs 2 GPU(s)"),
    (["--mode", "colocated"], "run.mode=colocated needs 1 GPU(s)"),
    (["--mode", "colocated", "--set", "run.overlap=true"], "run.overlap=true needs run.mode=split"),
    (["--mode", "split", "--set", "run.rollout_replicas=0"], "run.rollout_replicas=0 must be > 0"),
    (["--set", "run.device=tpu"], "run.device='tpu' is unknown"),
])
def test_driver_refuses_bad_config_before_ray(root, tmp_path, args, needle):
    """One line on stderr, exit status 2, Ray never imported, nothing written."""
    code = ("import sys; from opd.programs import train; rc = train.main(sys.argv[1:]); "
            "assert 'ray' not in sys.modules, 'ray was imported'; sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code, *args, "--set", f"run.out_dir={tmp_path}"],
                         cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], out.stderr
    assert list(tmp_path.iterdir()) == []


def test_sampled_rkl_needs_the_sampler_temperature():
    cfg = override(tiny_cpu(), "loss.kind=sampled_rkl")
    with pytest.raises(ConfigError, match="loss.kind=sampled_rkl needs loss.temperature"):
        override(cfg, "loss.temperature=2.0")


@pytest.mark.parametrize("name", ["tiny_cpu", "smollm2_cpu", "qwen25_1p5b_from_7b", "qwen3_1p7b_from_8b",
                                  "llama32_1b_from_3b", "gemma3_1b_from_4b"])
def test_every_preset_validates(name):
    cfg = preset(name)
    assert cfg.train.steps > 0 and cfg.model.student != cfg.model.teacher
    if name.endswith("_cpu"):
        assert cfg.run.mode == "cpu"
    else:  # the real pairs: bf16 serving weights on a GPU, the anchors' global batch
        assert cfg.run.mode == "colocated" and cfg.model.dtype == "bfloat16" and cfg.train.prompts_per_step == 128
        # memory by token budget, not by the batch
        assert cfg.learner.micro_batch_tokens > 0 and cfg.teacher.micro_batch_tokens > 0
        assert cfg.learner.gradient_checkpointing and cfg.learner.compute_dtype == "bfloat16"


def _driver_error(root, *args) -> str:
    code = ("import sys; from opd.programs import train; rc = train.main(sys.argv[1:]); "
            "assert 'ray' not in sys.modules, 'ray was imported'; sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code, *args], cwd=root, capture_output=True, text=True, timeout=300)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), out.stderr[-2000:]
    return lines[0]


def test_tokenizer_mismatch_stops_before_ray(root, tmp_path):
    teacher = tmp_path / "teacher"
    shutil.copytree(root / "assets/toy/teacher", teacher)
    tokenizer = json.loads((teacher / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    vocab["7"], vocab["8"] = vocab["8"], vocab["7"]  # same tokens, two ids swapped
    (teacher / "tokenizer.json").write_text(json.dumps(tokenizer))
    line = _driver_error(root, "--set", f"model.teacher={teacher}", "--set", f"run.out_dir={tmp_path / 'runs'}")
    assert "'7'" in line or "'8'" in line, line
    assert not (tmp_path / "runs").exists()


def test_malformed_dataset_line_stops_before_ray(root, tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": "2+2=", "answer": "4"}\n{"prompt": "oops"\n')
    line = _driver_error(root, "--set", f"data.source={data}", "--set", "data.chat_template=false",
                         "--set", "data.num_eval_prompts=1", "--set", f"run.out_dir={tmp_path / 'runs'}")
    assert "prompts.jsonl:3" in line, line


def test_rollout_compile_is_the_cpu_decode_loops():
    """rollout.compile: refused with another sampler or engine, outside cpu mode, and (preflight, before Ray)
    without a C++ compiler for inductor's CPU kernels."""
    import torch._inductor.config

    from opd.preflight import check_compiler

    cfg = override(tiny_cpu(), "rollout.compile=true")
    with pytest.raises(ConfigError, match="rollout.compile=true compiles the hf engine's decode loop"):
        override(cfg, "rollout.sampler=generate")
    with pytest.raises(ConfigError, match="use it with run.mode=cpu"):
        override(cfg, "run.mode=colocated")
    # inductor's own patching (monkeypatch's undo deletes the setting from inductor's config module)
    with torch._inductor.config.patch({"cpp.cxx": (None, "/no/such/c++")}):
        with pytest.raises(ConfigError, match="needs a C\\+\\+ compiler .* or set rollout.compile=false"):
            check_compiler(cfg)
    check_compiler(cfg)  # the compiler found again
    check_compiler(tiny_cpu())  # off: nothing to check
