"""Bad input stops with one `error:` line before Ray starts (exit 2), and a numerical fault stops a run with a
message naming the step (exit 1). Refusals already tested elsewhere: unknown loss / mode / preset, non-positive
steps / batch size / lr, GPU modes without GPUs, a missing model folder (test_config.py), a tokenizer mismatch
and a malformed JSONL line named by file and line (test_config.py, test_datasets.py)."""

import importlib.util
import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, get_scheduler

from opd.programs import train
from opd import checkpoint
from opd.config import ConfigError
from opd.overrides import override
from opd.presets import tiny_cpu
from opd.metrics import read_jsonl
from opd.preflight import make_run_dir, preflight

NO_RAY = ("import sys; from opd.programs import train; rc = train.main(sys.argv[1:]); "
          "assert 'ray' not in sys.modules, 'ray was imported'; sys.exit(rc)")


def _refused(root, *args) -> str:
    """Run the driver; it must exit 2 with one `error:` line, no traceback, and without importing Ray."""
    out = subprocess.run([sys.executable, "-c", NO_RAY, *args], cwd=root, capture_output=True, text=True, timeout=300)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), out.stderr[-3000:]
    assert "Traceback" not in out.stdout + out.stderr
    return lines[0]


def _preflight_error(*args: str) -> str:
    with pytest.raises(ConfigError) as info:
        preflight(train.parse_args(list(args)))
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.fixture(scope="module")
def run_dir(root, tmp_path_factory):
    """A run directory as the driver leaves it at step 2 of 4: config.json and checkpoints/step_2 (written by
    the learner's own functions), no Ray involved."""
    cfg = override(override(override(tiny_cpu(), f"run.out_dir={tmp_path_factory.mktemp('runs')}"),
                            "run.name=run"), "train.steps=4")
    path = make_run_dir(cfg)
    model = AutoModelForCausalLM.from_pretrained(root / "assets/toy/student", dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=0, num_training_steps=4)
    checkpoint.write(checkpoint.step_dir(path, 2), lambda tmp: checkpoint.save_learner(
        tmp, model, optimizer, scheduler, version=2, tokenizer_source=str(root / "assets/toy/student")),
        {"step": 2, "data": {"epoch": 0, "cursor": 128, "seed": 0}, "skip_streak": 0, "config": cfg.to_dict()})
    return path


# ------------------------------------------------------------------ through the driver, in a fresh process


def test_resume_without_a_checkpoint(root, tmp_path, run_dir):
    empty = tmp_path / "empty_run"
    empty.mkdir()
    shutil.copy(run_dir / "config.json", empty / "config.json")
    line = _refused(root, "--resume", str(empty))
    assert "no complete checkpoint" in line and str(empty) in line


def test_resume_from_a_corrupt_checkpoint_names_the_file(root, tmp_path, run_dir):
    corrupt = tmp_path / "corrupt_run"
    shutil.copytree(run_dir, corrupt)
    weights = checkpoint.step_dir(corrupt, 2) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0x01
    weights.write_bytes(bytes(data))
    line = _refused(root, "--resume", str(corrupt))
    assert f"checkpoint file {weights} does not match its sha256" in line


def test_output_directory_that_cannot_be_created(root, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    line = _refused(root, "--set", f"run.out_dir={blocker}/runs", "--set", "run.name=x")
    assert f"run.out_dir={blocker}/runs: cannot create" in line


def test_model_folder_without_weights(root, tmp_path):
    student = tmp_path / "student"
    shutil.copytree(root / "assets/toy/student", student)
    (student / "model.safetensors").unlink()
    line = _refused(root, "--set", f"model.student={student}", "--set", f"run.out_dir={tmp_path}/runs")
    assert f"model.student={student}: {student} has a config.json but no weights" in line


# ------------------------------------------------------------------ in process: parse_args + preflight


def test_resume_argument_errors(tmp_path, run_dir):
    with pytest.raises(ConfigError, match="no run directory there"):
        train.parse_args(["--resume", str(tmp_path / "nowhere")])
    with pytest.raises(ConfigError, match="drop --preset / --mode"):
        train.parse_args(["--resume", str(run_dir), "--preset", "tiny_cpu"])
    assert "was written with loss.kind='rkl', this run has 'fkl'" in _preflight_error(
        "--resume", str(run_dir), "--set", "loss.kind=fkl")
    assert "checkpoint is at step 2 and train.steps=2: nothing left to do" in _preflight_error(
        "--resume", str(run_dir), "--set", "train.steps=2")


def test_unreadable_model_files(root, tmp_path):
    broken = tmp_path / "broken_config"
    shutil.copytree(root / "assets/toy/teacher", broken)
    (broken / "config.json").write_text("{not json")
    assert "not a valid JSON file" in _preflight_error("--set", f"model.teacher={broken}")
    truncated = tmp_path / "truncated"
    shutil.copytree(root / "assets/toy/teacher", truncated)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    message = _preflight_error("--set", f"model.teacher={truncated}")
    assert f"{truncated / 'model.safetensors'} is not a readable safetensors file" in message


@pytest.mark.parametrize("content,needle", [
    ("\n\n", "dataset has no rows"),
    ('{"text": "1+1="}\n', "no prompt field; found ['text']"),
    ('{"prompt": ""}\n{"prompt": "  "}\n', "all with an empty 'prompt'"),
    (('{"prompt": "' + "1+1=" * 40 + '"}\n') * 3, "training prompts are longer than data.max_prompt_tokens=8"),
])
def test_unusable_datasets(tmp_path, content, needle):
    data = tmp_path / "prompts.jsonl"
    data.write_text(content)
    message = _preflight_error("--set", f"data.source={data}", "--set", "data.chat_template=false",
                               "--set", "data.num_eval_prompts=1", "--set", "data.max_prompt_tokens=8")
    assert needle in message and str(data) in message, message


@pytest.mark.parametrize("assignment,needle", [
    ("train.save_every=-1", "train.save_every=-1 must be >= 0"),
    ("train.keep_checkpoints=0", "train.keep_checkpoints=0 must be > 0"),
    ("train.max_consecutive_skips=-2", "train.max_consecutive_skips=-2 must be >= 0"),
])
def test_new_settings_are_validated(assignment, needle):
    with pytest.raises(ConfigError, match=needle):
        override(tiny_cpu(), assignment)


def test_sglang_requested_but_not_installed(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sglang" else real(name, *a))
    assert "sglang is not installed" in _preflight_error("--mode", "colocated", "--set", "rollout.engine=sglang")
    assert "rollout.engine=sglang needs --mode colocated or split on GPUs" in _preflight_error("--set", "rollout.engine=sglang")


# ------------------------------------------------------------------ a numerical fault during the run


@pytest.mark.slow
def test_non_finite_steps_stop_the_run_naming_the_step(root, tmp_path):
    """A teacher whose final norm is NaN makes every loss non-finite: each step is skipped, and the run stops at
    train.max_consecutive_skips instead of running on to train.steps."""
    teacher = tmp_path / "nan_teacher"
    shutil.copytree(root / "assets/toy/teacher", teacher)
    tensors = load_file(teacher / "model.safetensors")
    tensors["model.norm.weight"][:] = float("nan")
    save_file(tensors, teacher / "model.safetensors", metadata={"format": "pt"})
    args = ["--set", f"model.teacher={teacher}", "--set", "train.steps=6", "--set", "train.max_consecutive_skips=2",
            "--set", "train.prompts_per_step=4", "--set", "data.num_eval_prompts=4", "--set", "train.eval_every=0",
            "--set", f"run.out_dir={tmp_path}", "--set", "run.name=nan", "--set", "run.progress=false"]
    out = subprocess.run([sys.executable, "driver.py", *args], cwd=root, capture_output=True, text=True, timeout=600)
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: step 2: the last 2 steps (from step 1)") and "lower learner.lr" in last, last
    assert "Traceback" not in out.stderr
    steps = read_jsonl(tmp_path / "nan" / "metrics.jsonl")
    assert [r["step"] for r in steps] == [1, 2] and all(r["step/skipped"] == 1.0 for r in steps)
    assert json.loads((tmp_path / "nan" / "config.json").read_text())["train"]["max_consecutive_skips"] == 2


# ------------------------------------------------------------------ issue 16: refusals found by trying more cases


@pytest.mark.parametrize("assignment,needle", [
    ("learner.lr=inf", "learner.lr=inf is not a finite number"),
    ("loss.temperature=inf", "loss.temperature=inf is not a finite number"),
    ("rollout.top_p=nan", "rollout.top_p=nan must be in (0, 1]"),
    ("run.name=../../escape", "run.name='../../escape' must be one folder name (no '/', no '..')"),
    ("run.name=/tmp/elsewhere", "run.name='/tmp/elsewhere' must be one folder name"),
    ("run.name=..", "run.name='..' must be one folder name"),
])
def test_non_finite_numbers_and_run_names_outside_out_dir(assignment, needle):
    with pytest.raises(ConfigError) as info:
        override(tiny_cpu(), assignment)
    assert needle in str(info.value)


def test_a_second_process_on_a_run_directory_is_refused(root, tmp_path, run_dir):
    """Two `--resume` of one run at once: the second stops with one line before it reads or changes anything."""
    run = tmp_path / "held_run"
    shutil.copytree(run_dir, run)
    def files():
        return sorted((p.relative_to(run), p.stat().st_mtime_ns) for p in run.rglob("*") if p.name != ".lock")

    before = files()
    holder = subprocess.Popen([sys.executable, "-c", "import sys; from pathlib import Path; "
                               "from opd.preflight import RunLock; lock = RunLock(Path(sys.argv[1])); "
                               "print('held', flush=True); sys.stdin.read()", str(run)],
                              cwd=root, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        line = _refused(root, "--resume", str(run))
        assert line == (f"error: run directory {run} is in use by pid {holder.pid} on {__import__('socket').gethostname()}"
                        f": one process per run; wait for it to end (or stop it) and try again")
        assert files() == before
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    from opd.preflight import RunLock

    RunLock(run).release()  # the holder gone, the lock is free again


def test_responses_past_the_models_positions(monkeypatch):
    message = _preflight_error("--set", "rollout.max_new_tokens=40")  # toy models: 32 positions, 6-token prompts
    assert message == ("the longest prompt (6 tokens) plus rollout.max_new_tokens=40 is 46 positions, beyond "
                       "model.student's max_position_embeddings=32: lower rollout.max_new_tokens or "
                       "data.max_prompt_tokens")


def test_more_cpus_than_the_machine_has(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    message = _preflight_error("--set", "run.cpus_per_actor=100")
    assert message.startswith("run.cpus_per_actor=100 for 3 actors asks for 300 CPUs, this machine has ")
    assert message.endswith(": lower run.cpus_per_actor (it is Ray's scheduling share; run.threads_per_actor "
                            "sets the threads)")


def test_a_config_that_does_not_describe_the_weights(root, tmp_path):
    """transformers loads either one anyway: another architecture as a freshly initialised model (the run
    trained noise and exited 0), another width as an 88-line traceback from inside an actor."""
    from transformers import GPT2Config

    other = tmp_path / "gpt2_config"
    shutil.copytree(root / "assets/toy/student", other)
    GPT2Config(n_embd=64, n_layer=2, n_head=2, vocab_size=16, bos_token_id=1, eos_token_id=1).save_pretrained(other)
    line = _refused(root, "--set", f"model.student={other}", "--set", f"run.out_dir={tmp_path}/runs")
    assert line == (f"error: model.student={other}: config.json describes a gpt2 model (GPT2LMHeadModel) and 28 of "
                    f"its 28 tensors are not in the weights (first: transformer.wte.weight; the weights hold "
                    f"model.embed_tokens.weight, ...): use the config.json saved with these weights")
    wide = tmp_path / "wide_config"
    shutil.copytree(root / "assets/toy/teacher", wide)
    config = json.loads((wide / "config.json").read_text())
    (wide / "config.json").write_text(json.dumps({**config, "intermediate_size": 2 * config["intermediate_size"]}))
    message = _preflight_error("--set", f"model.teacher={wide}")
    assert message.startswith(f"model.teacher={wide}: config.json does not match the weights: model.layers.0.mlp.")
    assert not (tmp_path / "runs").exists()  # refused before the run directory


def test_resume_trust_the_only_checkpoint_truncated_or_without_its_manifest(root, tmp_path, run_dir):
    truncated = tmp_path / "truncated_run"
    shutil.copytree(run_dir, truncated)
    weights = checkpoint.step_dir(truncated, 2) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    message = _preflight_error("--resume", str(truncated))
    assert message.startswith(f"checkpoint file {weights} has 100 bytes, the manifest says ")
    assert message.endswith("it is the run's only checkpoint: start the run again (python driver.py --config "
                            f"{truncated / 'config.json'} --set run.name=<new name>)")
    unsigned = tmp_path / "unsigned_run"
    shutil.copytree(run_dir, unsigned)
    (checkpoint.step_dir(unsigned, 2) / checkpoint.MANIFEST).unlink()
    assert _preflight_error("--resume", str(unsigned)) == (
        f"--resume {unsigned}: step_2 under {unsigned / 'checkpoints'} has no manifest.json (an interrupted save or "
        f"a partial copy) and there is no complete checkpoint: start the run again")


def test_resume_trust_a_newer_step_without_its_manifest(root, tmp_path, run_dir, capsys):
    run = tmp_path / "newer_run"
    shutil.copytree(run_dir, run)
    shutil.copytree(checkpoint.step_dir(run, 2), checkpoint.step_dir(run, 3))
    (checkpoint.step_dir(run, 3) / checkpoint.MANIFEST).unlink()
    shutil.copytree(checkpoint.step_dir(run, 3), checkpoint.step_dir(run, 1))
    prepared = preflight(train.parse_args(["--resume", str(run)]))
    assert prepared.resume_from == checkpoint.step_dir(run, 2)
    assert (f"warning: {checkpoint.step_dir(run, 3)} has no manifest.json (an interrupted save): resuming from "
            f"step_2; step_3 is replaced when the run gets to its step") in capsys.readouterr().err
    prepared.lock.release()
    checkpoint.prune(run, keep=1)  # older step folders without a manifest go with the pruning; newer ones stay
    assert sorted(d.name for d in (run / "checkpoints").iterdir()) == ["step_2", "step_3"]


def test_resume_trust_files_of_two_checkpoints(tmp_path, run_dir, monkeypatch):
    """Each file whole (the manifest checks that), but run_state.json and trainer_state.pt of different steps."""
    from opd.metrics import RunStopped

    class Actors:  # the learners' answer: the version trainer_state.pt holds
        @staticmethod
        def load_checkpoint(path):
            return 5

    path = checkpoint.step_dir(run_dir, 2)
    state = checkpoint.read_run_state(path)
    restore = checkpoint.Checkpoints(tiny_cpu(), run_dir, Actors, stream=None, skips=None).restore
    monkeypatch.setattr(checkpoint, "read_run_state", lambda p: {**state, "policy_version": 2})
    with pytest.raises(RunStopped, match=r"run_state.json was written at policy version 2 and trainer_state.pt at 5"):
        restore(path)
