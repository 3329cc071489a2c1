"""`python -m opd.programs.doctor` on this CPU machine, and on simulated machines: a broken or missing cupy, a CUDA-less
torch beside a GPU, a driver too old for torch's CUDA, a missing sglang; the `gpu` extra against sglang's own
requirements; the PyPI `kernels` package, and a `kernels/` folder that would shadow it; tests/gpu failing, not
skipping, on a broken GPU dependency."""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import json
import re
import subprocess
import sys
import tomllib
import warnings
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement

from opd import modes
from opd.config import ConfigError
from opd.overrides import override
from opd.presets import preset
from opd.programs import doctor, doctor_checks, doctor_gpu

sys.path.insert(0, str(Path(__file__).resolve().parent / "gpu"))
import gpu_deps  # noqa: E402  (tests/gpu on the path)
from test_sampling import _nvcc, gpu_machine  # noqa: E402, F401  (a fake FlashInfer machine; gpu_machine: a fixture)


def _lines(text: str) -> dict[str, tuple[str, str]]:
    """name -> (mark, detail) of the doctor's report."""
    out = {}
    for line in text.splitlines()[1:]:
        m = re.match(r"  (ok|FAIL|--)\s+(\S+(?: \S+)?)\s{2,}(.*)", line)
        if m:
            out[m.group(2)] = (m.group(1), m.group(3))
    return out


def test_doctor_as_the_readme_types_it(root):
    readme = (root / "docs" / "gpu.md").read_text()  # the GPU install's page, as the README links it
    command = re.search(r"^(\.venv/bin/python -m opd\.programs\.doctor --gpu)\s", readme, re.M).group(1)
    assert Path(sys.executable).resolve() == (root / ".venv/bin/python").resolve(), "the tests run in the README's venv"
    out = subprocess.run(command, shell=True, cwd=root, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert len(out.stdout.splitlines()) <= 30, "one screen"
    lines = _lines(out.stdout)
    # the test command's torch is sglang's CUDA build, which runs on this CPU: the doctor names its build
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU build"
    assert lines["torch"] == ("ok", f"{torch.__version__} ({build})")
    assert lines["transformers"] == ("ok", f"{importlib.metadata.version('transformers')} "
                                           f"({', '.join(doctor_checks.MODEL_CLASSES)} import)")
    assert lines["kernels"] == ("ok", f"{importlib.metadata.version('kernels')} (PyPI's, the one transformers and sglang "
                                      f"import)")
    assert lines["glibc"][0] == "ok"
    assert lines["ray"] == ("ok", importlib.metadata.version("ray"))
    assert lines["python"][1] == ".".join(map(str, sys.version_info[:3]))
    # the test command installs sglang without its dependencies: the doctor says so, with what is missing
    assert lines["sglang"][0] == "--" and "installed without its pins" in lines["sglang"][1]
    # the test command's torch is sglang's own: what is missing is the GPU side (FlashInfer)
    assert "flashinfer_python missing, pins 0.7.2" in lines["sglang"][1] and "torch" not in lines["sglang"][1]
    assert lines["gpus"] == ("--", "no GPU (no NVIDIA driver or device on this machine)")
    assert lines["mode cpu"] == ("ok", "ready")
    for mode in ("colocated", "split"):
        assert lines[f"mode {mode}"][0] == "--" and lines[f"mode {mode}"][1].startswith("not available: no GPU")
    assert lines["gpu micro-checks"] == ("--", "no usable GPU (see gpus)")


def test_json_has_the_same_checks(tmp_path):
    opd = Path(sys.executable).parent / "opd"  # the console script's `opd doctor`, from another directory
    out = subprocess.run([str(opd), "doctor", "--json"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    checks = {c["name"]: c for c in json.loads(out.stdout)}
    assert out.returncode == 0 and checks["mode cpu"]["status"] == "ok" and checks["mode split"]["status"] == "skip"
    assert set(checks["torch"]) == {"name", "status", "detail", "fix"}


def _fake_dist(path: Path, dist: str, version: str, package: str, body: str) -> None:
    """An installed distribution `dist` whose package `package` runs `body` on import."""
    (path / package).mkdir(parents=True)
    (path / package / "__init__.py").write_text(body)
    info = path / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")


def _checks(**kw) -> dict[str, doctor_checks.Check]:
    return {c.name: c for c in doctor.run_checks(**kw)}


def test_cupy_missing_or_broken_is_named_and_not_needed(tmp_path, monkeypatch):
    assert _checks()["cupy"].detail.startswith("not installed; not needed")
    _fake_dist(tmp_path, "cupy-cuda12x", "13.6.0", "cupy",
               "raise ImportError('libnccl.so.2: cannot open shared object file')")
    monkeypatch.syspath_prepend(str(tmp_path))
    cupy = _checks()["cupy"]
    assert cupy.status == "skip" and cupy.fix == "pip uninstall cupy-cuda12x, or install the cupy of torch's CUDA"
    assert cupy.detail.startswith("cupy-cuda12x 13.6.0 does not import (ImportError: libnccl.so.2: cannot open")
    assert _checks()["mode cpu"].status == "ok"  # nothing here needs it


def test_a_broken_optional_gpu_package_fails(tmp_path, monkeypatch):
    _fake_dist(tmp_path, "flashinfer-python", "0.7.2", "flashinfer", "raise OSError('libcudart.so.13: not found')")
    monkeypatch.syspath_prepend(str(tmp_path))
    check = _checks()["flashinfer"]
    assert (check.status, check.detail) == ("fail", "flashinfer-python 0.7.2 does not import (OSError: "
                                                    "libcudart.so.13: not found)")


def _fake_nvidia(tmp_path: Path, monkeypatch, driver: str, gpus: int) -> None:
    proc = tmp_path / "nvidia"
    (proc / "gpus").mkdir(parents=True)
    for i in range(gpus):
        (proc / "gpus" / f"0000:{i:02x}:00.0").mkdir()
    (proc / "version").write_text(f"NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  {driver}  Release Build"
                                  f"  (dvs-builder@U16-I3-B03-4-3)  Thu Jul 31 2025\nGCC version:  gcc 12.3.0\n")
    monkeypatch.setattr(modes, "NVIDIA_PROC", proc)


def test_a_cuda_less_torch_beside_a_gpu(tmp_path, monkeypatch):
    _fake_nvidia(tmp_path, monkeypatch, "580.65.06", gpus=2)
    monkeypatch.setattr(torch.version, "cuda", None)
    checks = _checks()
    assert checks["gpus"].status == "fail" and checks["gpus"].detail == "2 present, none usable"
    assert checks["gpus"].fix.startswith(f"torch {torch.__version__} is a CPU build and this machine has 2 NVIDIA GPU(s)")
    assert checks["mode split"].status == "fail" and checks["mode cpu"].status == "ok"
    cfg = override(preset("tiny_cpu"), "run.mode=split")
    with pytest.raises(ConfigError, match=r"run.mode=split needs 2 GPU\(s\): torch .* is a CPU build and this "):
        modes.check_devices(cfg)


def test_a_driver_too_old_for_torchs_cuda_is_not_no_gpu(tmp_path, monkeypatch):
    _fake_nvidia(tmp_path, monkeypatch, "535.104.05", gpus=1)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    state = modes.cuda_state()
    assert state.unusable and state.why == (
        f"CUDA present but unusable: torch {torch.__version__} is built for CUDA 13.0, which needs NVIDIA driver "
        f">= 580, and this machine's is 535.104.05: update the driver (or install a torch for an older CUDA)")
    with pytest.raises(ConfigError, match=r"^run.mode=colocated needs 1 GPU\(s\): CUDA present but unusable"):
        modes.check_devices(override(preset("tiny_cpu"), "run.mode=colocated"))
    monkeypatch.setattr(modes, "NVIDIA_PROC", tmp_path / "none")  # no driver at all: the plain message
    with pytest.raises(ConfigError, match=r"needs 1 GPU\(s\), this machine has 0: use --mode cpu"):
        modes.check_devices(override(preset("tiny_cpu"), "run.mode=colocated"))


def test_a_missing_sglang(monkeypatch):
    real = doctor_checks.installed
    monkeypatch.setattr(doctor_checks, "installed", lambda dist: None if dist == "sglang" else real(dist))
    check = _checks()["sglang"]
    assert check.status == "skip" and check.detail.startswith("not installed: the rollout.engine=sglang GPU engine")
    assert check.fix == "pip install -e '.[gpu]'"


def test_the_doctor_says_which_sampler_auto_picks_and_why(gpu_machine, tmp_path, monkeypatch):
    assert "sampler auto" in _checks()  # a line of the report, after the GPUs'
    assert doctor_checks.sampler_check(gpu=False) == doctor_checks.Check(
        "sampler auto", "ok", "torch: no usable GPU (FlashInfer samples on a GPU)")
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "flashinfer", None)  # a GPU, and no flashinfer
        assert doctor_checks.sampler_check(gpu=True) == doctor_checks.Check(
            "sampler auto", "skip", "torch, not flashinfer: flashinfer is not installed",
            "pip install -e '.[gpu]', or set rollout.sampler=torch")
    gpu_machine("flashinfer")  # a driver-only GPU machine: no nvcc
    check = doctor_checks.sampler_check(gpu=True)
    assert check.status == "skip" and check.detail.startswith("torch, not flashinfer: flashinfer compiles its kernels "
                                                              "at first use and finds no nvcc")
    assert check.fix == "install the CUDA toolkit (nvcc) or flashinfer-jit-cache, or set rollout.sampler=torch"
    monkeypatch.setenv("CUDA_HOME", _nvcc(tmp_path / "cuda"))
    assert doctor_checks.sampler_check(gpu=True) == doctor_checks.Check(
        "sampler auto", "ok", f"flashinfer: it imports and has nvcc {tmp_path / 'cuda' / 'bin' / 'nvcc'}")


# ---------------------------------------------------------------- the gpu extra against sglang's requirements


def _cuda_majors(requirements) -> set[int]:
    """CUDA majors named by requirements: a `cu13` extra or suffix, `cupy-cuda12x`, `cuda-python>=13`."""
    majors = set()
    for req in requirements:
        for text in (req.name, *req.extras):
            majors |= {int(m) for m in re.findall(r"(?:^|[-_])cu(?:da)?(\d{2})x?$", text)}
        if req.name == "cuda-python":
            majors |= {int(s.version.split(".")[0]) for s in req.specifier if s.operator in (">=", "==")}
    return majors


def test_the_gpu_extra_agrees_with_sglangs_own_requirements(root):
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    ours = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["gpu"]]
    sglang_pin = next(r for r in ours if r.name == "sglang")
    installed = importlib.metadata.version("sglang")  # installed with --no-deps by the test command: its metadata
    assert sglang_pin.specifier.contains(installed), f"the extra pins {sglang_pin}, the tests read sglang {installed}"
    env = {"sys_platform": "linux", "platform_machine": "x86_64", "extra": ""}
    theirs = {}
    for text in importlib.metadata.requires("sglang"):
        req = Requirement(text)
        if req.marker is None or req.marker.evaluate(env):
            theirs[req.name.lower().replace("_", "-")] = req
    for req in ours:
        other = theirs.get(req.name.lower().replace("_", "-"))
        for a, b in ((req, other), (other, req)):  # a pin on either side must satisfy the other's specifier
            pins = [s.version for s in (a.specifier if a else []) if s.operator == "=="]
            for pin in pins:
                assert b is None or b.specifier.contains(pin, prereleases=True), f"{req.name}: ours {req}, sglang's {other}"
        if other is not None and req.extras != other.extras and other.extras:
            assert req.extras == other.extras, f"{req.name}: ours {req}, sglang's {other}"
    assert _cuda_majors(theirs.values()) == {13}, "sglang 0.5.23 is a CUDA 13 stack"
    assert _cuda_majors(ours) <= {13}, f"the gpu extra names another CUDA: {[str(r) for r in ours]}"
    torch_pin = next(str(s.version) for s in theirs["torch"].specifier)
    readme = (root / "docs" / "gpu.md").read_text()
    for fact in (f"sglang {installed}", f"torch {torch_pin}", "CUDA 13", "driver >= 580",
                 f"flashinfer {next(s.version for s in theirs['flashinfer-python'].specifier)}"):
        assert fact in readme, f"docs/gpu.md: {fact!r}"


def test_the_cuda_check_sees_a_cupy_for_the_wrong_cuda():
    assert _cuda_majors([Requirement("cupy-cuda12x"), Requirement("flashinfer-python[cu13]==0.7.2")]) == {12, 13}


# ---------------------------------------------------------------- PyPI `kernels` and what would shadow it


def test_the_doctor_sees_a_kernels_folder_that_shadows_pypi_kernels(tmp_path):
    """The project's layout before 2026-12-07, in a folder of its own: a top-level `kernels/` where Python starts.
    The doctor names the shadow, and says whether transformers' models still import there: transformers >= 5.25
    imports PyPI `kernels` with them and fails (mode cpu not ready), 5.19 (sglang's pin) does not (the doctor
    had said `ready` and the shadow `harmless` either way, without trying)."""
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text('"""a folder of a project, not the PyPI library"""\n')
    out = subprocess.run([sys.executable, "-m", "opd.programs.doctor"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 1, out.stdout + out.stderr
    lines = _lines(out.stdout)
    shadow = str(tmp_path / "kernels" / "__init__.py")
    assert lines["kernels"] == ("FAIL", f"PyPI kernels {importlib.metadata.version('kernels')} is installed, but "
                                        f"`import kernels` finds {shadow}")
    models = subprocess.run([sys.executable, "-c", "import transformers; transformers.Qwen3ForCausalLM"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    if models.returncode == 0:
        assert lines["transformers"][0] == "ok" and lines["mode cpu"] == ("ok", "ready")
    else:
        assert lines["transformers"][0] == "FAIL" and "its models do not import (" in lines["transformers"][1]
        assert f"{shadow} shadows the PyPI kernels library transformers imports" in out.stdout
        assert lines["mode cpu"] == ("FAIL", "missing: transformers")


def test_a_model_class_that_does_not_import_fails_the_transformers_check(monkeypatch, tmp_path):
    """transformers installed but a model class failing to import (as with a shadowed `kernels` under
    transformers >= 5.25): FAIL, with the shadow named when `import kernels` finds one."""
    monkeypatch.setattr(doctor_checks, "MODEL_CLASSES", ("Qwen3ForCausalLM", "NoSuchModelForCausalLM"))
    check = doctor_checks._transformers_check()
    assert check.status == "fail" and "but its models do not import (AttributeError" in check.detail
    assert check.fix == "pip install -c constraints.txt -e ."
    shadow = tmp_path / "kernels" / "__init__.py"
    shadow.parent.mkdir()
    shadow.write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "kernels", raising=False)
    check = doctor_checks._transformers_check()
    assert check.fix.startswith(f"{shadow} shadows the PyPI kernels library transformers imports")
    assert doctor_checks._kernels_check().status == "fail"


def test_sglangs_import_of_pypi_kernels_finds_it(root):
    """sglang 0.5.23 imports PyPI `kernels` in one place (FlashAttention-3 from the hub, behind
    SGLANG_USE_SGL_FA3_KERNEL); from the project's root those names import (a top-level `kernels/` of the
    project's made that import raise, and sglang fell back with a warning)."""
    spec = importlib.util.find_spec("sglang")
    base = Path(spec.submodule_search_locations[0])
    sites = []
    for path in base.rglob("*.py"):
        text = path.read_text(errors="replace")
        if not re.search(r"^\s*(?:from\s+kernels\b|import\s+[^\n#]*\bkernels\b)", text, re.M):
            continue  # only files with an import statement naming `kernels` are parsed (ast below decides)
        with warnings.catch_warnings():  # sglang's own invalid escape sequences
            warnings.simplefilter("ignore", SyntaxWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            tree = ast.parse(text)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "kernels":
                sites.append((path.relative_to(base).as_posix(), node.module, [a.name for a in node.names]))
            elif isinstance(node, ast.Import) and any(a.name.split(".")[0] == "kernels" for a in node.names):
                sites.append((path.relative_to(base).as_posix(), None, [a.name for a in node.names]))
    assert [s[0] for s in sites] == ["kernels/ops/attention/flash_attention_v3.py"], sites
    (_, module, names), = sites
    code = f"from {module} import {', '.join(names)}" if module else f"import {', '.join(names)}"
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, (code, out.stderr[-2000:])


# ---------------------------------------------------------------- tests/gpu on a broken GPU machine


def _outcome(fn, *args, **kwargs) -> tuple[str, str]:
    """How a tests/gpu check ends: ("fail" | "skip" | "ok", message). A skip is caught too, or it would skip
    this test instead of failing it."""
    try:
        fn(*args, **kwargs)
    except pytest.fail.Exception as e:
        return "fail", str(e)
    except pytest.skip.Exception as e:
        return "skip", str(e)
    return "ok", ""


def test_tests_gpu_fail_not_skip_on_a_broken_dependency(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    _fake_dist(tmp_path, "cupy-cuda12x", "13.6.0", "cupy", "raise ImportError('libnccl.so.2: cannot open')")
    _fake_dist(tmp_path, "triton", "3.9.0", "triton", "raise RuntimeError('no CUDA toolkit for the compiler')")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "triton", raising=False)  # the real one, if a kernel test imported it
    for module in ("cupy", "triton"):
        for required in (True, False):  # broken is broken, optional or not
            status, message = _outcome(gpu_deps.needs, module, required=required)
            assert status == "fail" and message.startswith(f"{module} is installed but does not import"), message
    assert _outcome(gpu_deps.needs, "not_a_module") == (
        "fail", "not_a_module is not installed; it is a GPU dependency: " + gpu_deps.FIX)
    assert _outcome(gpu_deps.needs, "not_a_module", required=False) == ("skip", "not_a_module is not installed")
    assert _outcome(gpu_deps.needs, "json")[0] == "ok"
    monkeypatch.setattr(torch.distributed, "is_nccl_available", lambda: False)
    assert _outcome(gpu_deps.nccl)[0] == "fail"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU machine: every one of them skips
    assert _outcome(gpu_deps.needs, "cupy") == ("skip", "needs 1 CUDA GPU")


def test_tests_gpu_check_their_dependencies_through_gpu_deps(root):
    for path in sorted((root / "tests" / "gpu").glob("test_*.py")):
        text = path.read_text()
        assert "importorskip" not in text, f"{path.name}: use gpu_deps.needs (a broken dependency must fail)"
        assert "find_spec" not in text, f"{path.name}: use gpu_deps.needs"


# ---------------------------------------------------------------- the --gpu micro-checks' logic, on CPU


def test_the_ipc_check_maps_memory_across_processes_on_cpu():
    """The same check as on a GPU, with the shared-memory file the colocated plumbing uses on CPU."""
    check = doctor_gpu.ipc_round_trip(device="cpu")
    assert (check.status, check.detail) == ("ok", "4 MiB mapped by a second process: read intact, its write seen here")


def test_the_communicator_check_on_gloo():
    check = doctor_gpu.nccl_one_gpu(backend="gloo")
    assert (check.status, check.detail) == ("ok", "a one-rank gloo all-reduce returned its input")


@pytest.mark.parametrize("measured,status", [(700e12, "ok"), (100e12, "fail")])
def test_a_roof_far_below_the_datasheet_fails(measured, status, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    check = doctor_gpu._against_datasheet("bf16 gemm", measured, 989e12, "TFLOP/s", 1e12)
    assert check.status == status and check.detail.startswith(f"{measured / 1e12:.0f} TFLOP/s, ")


def test_the_doctor_runs_on_a_box_with_only_torch_triton_and_transformers(root):
    """A lent GPU box has torch, triton and transformers, no Ray, pyarrow, sglang: the doctor must run there and
    say what is missing. Simulated: those packages neither import nor appear installed. (PyYAML stays: it is a
    dependency of transformers, whose models need it through huggingface_hub.)"""
    code = """
import importlib.abc, importlib.metadata, sys
HIDDEN = ("ray", "pyarrow", "sglang", "flashinfer", "cupy", "matplotlib")
class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HIDDEN:
            raise ModuleNotFoundError(f"No module named {name!r}")
sys.meta_path.insert(0, Hide())
real = importlib.metadata.version
def version(dist):
    if dist.lower().replace("_", "-").split("-")[0] in HIDDEN:
        raise importlib.metadata.PackageNotFoundError(dist)
    return real(dist)
importlib.metadata.version = version
from opd.programs import doctor
sys.exit(doctor.main(["--gpu"]))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, out.stdout + out.stderr  # a failure to report, not a crash
    lines = _lines(out.stdout)
    assert lines["ray"] == ("FAIL", "not installed") and lines["pyarrow"] == ("FAIL", "not installed")
    assert lines["sglang"][0] == "--" and lines["mode cpu"] == ("FAIL", "missing: ray, pyarrow")
    assert lines["torch"][0] == "ok" and lines["triton"][0] == "ok"
