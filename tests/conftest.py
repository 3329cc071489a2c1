import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


def whole(parts, batch, field: str = "hidden_states"):
    """The teacher's per-micro-batch parts (TeacherActor.score) put back in the batch's response-token order."""
    parts = list(parts)
    first = getattr(parts[0], field)
    out = torch.full((batch.num_response_tokens, *first.shape[1:]), float("nan"), dtype=first.dtype)
    for part in parts:
        out[part.token_index] = getattr(part, field)
    assert not out.isnan().any(), "the parts do not cover every response token"
    return out


@pytest.fixture(scope="session")
def pypi_kernels(root):
    """PyPI's `kernels` is installed, and from the project's root `import kernels` finds it, not a folder of ours."""
    import importlib.metadata
    import subprocess

    from opd.programs.doctor_checks import is_pypi_kernels

    version = importlib.metadata.version("kernels")  # PackageNotFoundError: the test extra did not install it
    where = subprocess.run([sys.executable, "-c", "import kernels; print(kernels.__file__)"], cwd=root,
                           capture_output=True, text=True, timeout=120)
    assert where.returncode == 0, where.stderr
    assert is_pypi_kernels(where.stdout.strip()), \
        f"`import kernels` from the project root finds {where.stdout.strip()}, not PyPI kernels {version}"
    return version


# One undisturbed run that the fault, signal, failure and resume tests compare with (or continue from): the default
# preset, 12 steps of 16 prompts, no evaluation between, a checkpoint every 4 steps. Credentials in its environment
# (test_resume: none reaches the run directory or the console, kept beside it in calm.console).
CALM_STEPS, CALM_SAVE_EVERY = 12, 4
CALM_ARGS = ("--set", f"train.steps={CALM_STEPS}", "--set", "train.eval_every=0", "--set",
             f"train.save_every={CALM_SAVE_EVERY}", "--set", "train.prompts_per_step=16", "--set",
             "data.num_eval_prompts=16", "--set", "run.progress=false")
SECRETS = {"HF_TOKEN": "hf_opdTestSecretA1b2C3d4E5f6", "HUGGING_FACE_HUB_TOKEN": "hf_opdTestSecretHubZ9y8X7",
           "RAY_AUTH_TOKEN": "0123456789abcdef" * 4}


def _session_run(root, out: Path, name: str, *args: str, env: dict | None = None) -> Path:
    """A driver run a session's tests share: `python driver.py ARGS` into out/name, which must succeed."""
    import os
    import subprocess

    done = subprocess.run([sys.executable, "driver.py", *args, "--set", f"run.out_dir={out}", "--set",
                           f"run.name={name}"], cwd=root, capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (out / f"{name}.console").write_text(done.stdout + done.stderr)
    return out / name


@pytest.fixture(scope="session")
def calm_run(root, tmp_path_factory) -> Path:
    return _session_run(root, tmp_path_factory.mktemp("calm"), "calm", *CALM_ARGS, env=SECRETS)


# A short run of the default preset with a strong teacher and another loss (test_driver: the student moves) whose
# step-0 evaluation test_evaluation compares with a run of another schedule: 3 steps, forward KL at lr 3e-3.
SHORT_ARGS = ("--set", "train.steps=3", "--set", "train.eval_every=2", "--set", "train.prompts_per_step=16",
              "--set", "data.num_eval_prompts=32", "--set", "run.progress=false")


@pytest.fixture(scope="session")
def short_run(root, tmp_path_factory) -> Path:
    return _session_run(root, tmp_path_factory.mktemp("short"), "short", *SHORT_ARGS, "--set", "loss.kind=fkl",
                        "--set", "learner.lr=3e-3")


def toy_states(root, batch, pad_id: int):
    """Fresh copies of the toy student and teacher, and their final hidden states at `batch`'s response
    positions, from materialised padded forwards (the student's with autograd): (student, teacher, h_s, h_t)."""
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(root / "assets/toy/student", dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(root / "assets/toy/teacher", dtype=torch.float32)
    ids, mask, pos = batch.padded(pad_id)
    h_s = student.model(input_ids=ids, attention_mask=mask).last_hidden_state.flatten(0, 1)[pos]
    with torch.no_grad():
        h_t = teacher.model(input_ids=ids, attention_mask=mask).last_hidden_state.flatten(0, 1)[pos]
    return student, teacher, h_s, h_t
