"""What the project puts into a user's environment, and beside what.

* One top-level name, `opd`: a top-level `kernels/` of the project's shadowed the PyPI `kernels` library that
  transformers (>= 5.25 depends on it) and sglang 0.5.23 import, and every model import failed
  (`cannot import name 'CUDAProperties' from 'kernels'`); `actors`, `cluster`, `kernels` are PyPI names too.
* The collision, tested where it happened: PyPI `kernels` is installed here (the test extra asks for it, as a GPU
  install and a fresh transformers have it; conftest's `pypi_kernels` checks that `import kernels` from the
  project's root finds it), and each entry point runs beside it: transformers' models import and pytest collects
  the suite from the root, where the script's folder comes first on `sys.path`; `python driver.py` runs 3 steps
  from the root (test_driver's zero-KL run), `opd train` 3 steps (test_trackers' run: a console script's
  `sys.path` starts with its own folder, wherever it runs); `ray job submit`: tests/test_ray_job.py.
* The README's test command is the one CI runs, and both README commands install from the lock.
"""

import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import pytest

from opd.programs.doctor_checks import is_pypi_kernels

DIST = "opd-ray"


def test_the_installed_distribution_puts_opd_alone_on_the_path():
    """What `pip install` recorded for this environment's install of the project (editable or not)."""
    top = importlib.metadata.distribution(DIST).read_text("top_level.txt").split()
    assert top == ["opd"], f"the project installs {top}: only `opd` may be a top-level name"
    scripts = {e.name: e.value for e in importlib.metadata.distribution(DIST).entry_points}
    assert scripts == {"opd": "opd.programs.cli:main"}


def test_the_wheel_holds_opd_alone(root, tmp_path):
    """A non-editable install's wheel: every file under opd/ (or the wheel's own metadata), driver.py not among
    them (a script of the checkout, not a module), every layer of the card inside opd/."""
    source = tmp_path / "source"  # a copy: pip builds in the source tree, which would leave build/ and egg-info
    shutil.copytree(root, source, ignore=shutil.ignore_patterns(".*", "runs", "build", "*.egg-info", "__pycache__",
                                                                  "assets", "docs", "data"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                            str(tmp_path), str(source)], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = tmp_path.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"opd", f"opd_ray-{importlib.metadata.version(DIST)}.dist-info"}, sorted(tops)
    for layer in ("actors", "cluster", "kernels", "transport", "programs"):
        assert f"opd/{layer}/__init__.py" in names


def test_transformers_models_import_beside_pypi_kernels(root, pypi_kernels):
    """From the project's root, the model classes import; where transformers takes PyPI `kernels` for usable
    (5.19.0, sglang's pin, only kernels 0.17.x; 5.25 depends on it), the `kernels` it imported is PyPI's."""
    code = ("import sys, transformers; from transformers.utils import is_kernels_available; "
            "[getattr(transformers, n) for n in ('Qwen3ForCausalLM', 'LlamaForCausalLM', 'Qwen2ForCausalLM')]; "
            "import transformers.integrations.hub_kernels; "
            "print(is_kernels_available(), getattr(sys.modules.get('kernels'), '__file__', None))")
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    available, where = out.stdout.split()
    if available == "True":
        assert is_pypi_kernels(where), f"transformers imported {where}, not PyPI kernels {pypi_kernels}"


def test_pytest_collects_the_suite_beside_pypi_kernels(root, pypi_kernels):
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"], cwd=root,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "error" not in out.stdout.splitlines()[-1], out.stdout[-3000:] + out.stderr[-2000:]
    assert re.search(r"^\d+ tests collected", out.stdout.splitlines()[-1]), out.stdout.splitlines()[-1]


def test_ci_runs_the_readme_test_command(root):
    readme = (root / "README.md").read_text()
    ci = (root / ".ci" / "run").read_text()
    command = next(line.strip() for line in ci.splitlines() if "pytest" in line and not line.startswith("#"))
    assert command in readme, f"the README must show the command CI runs: {command}"


def test_both_readme_commands_install_from_the_lock(root):
    """Each README set-up command installs with `-c constraints.txt` in every pip call, so a fresh machine gets
    the versions the suite ran with, not whatever was released the day before."""
    readme = (root / "README.md").read_text()
    block = re.search(r"## Two commands\n.*?```bash\n(.*?)```", readme, re.S).group(1)
    commands = [line for line in block.splitlines() if line.startswith("python3 -m venv")]
    assert len(commands) == 2
    for command in commands:
        installs = re.findall(r"\.venv/bin/pip install ([^&]*)", command)
        assert installs and all(i.startswith("-c constraints.txt ") for i in installs), command


def _lock(root, name: str) -> dict[str, str]:
    pins = {}
    for line in (root / name).read_text().splitlines():
        if line and not line.startswith("#"):
            dist, _, version = line.partition("==")
            assert version, f"{name}: {line!r} is not name==version"
            pins[dist] = version
    return pins


def test_this_environment_is_the_lock(root):
    """Every distribution of this environment that the lock names is at the lock's version (a test run on other
    versions would not be the run the lock claims), and every lock entry of the test extra is installed."""
    lock = _lock(root, "constraints.txt")
    # the environment's own site-packages: setuptools puts its vendored copies (importlib-metadata, packaging, ...)
    # on sys.path once imported, and those are not what pip installed
    site = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    installed = {d.metadata["Name"].lower().replace("_", "-"): d.version
                 for d in importlib.metadata.distributions(path=site)}
    wrong = {n: (installed[n], v) for n, v in lock.items() if n in installed and installed[n] != v}
    assert not wrong, f"installed vs constraints.txt: {wrong}"
    missing = sorted(set(lock) - set(installed))
    assert not missing, f"in constraints.txt but not installed: {missing}"
    # torch and torchvision: not in the lock (command 1 takes another torch); the test command names them
    pins = _test_command_torch(root)
    assert {n: installed.get(n, "").split("+")[0] for n in pins} == pins, (pins, installed.get("torch"))


def _test_command_torch(root) -> dict[str, str]:
    """torch and torchvision as the README's test command pins them."""
    command = next(line for line in (root / "README.md").read_text().splitlines()
                   if line.startswith("python3 -m venv") and "pytest" in line)
    return dict(re.findall(r"\b(torch|torchvision)==(\S+)", command))


def test_the_cpu_lock_shares_the_gpu_locks_versions(root):
    """The CPU suite runs what a GPU install runs: every distribution both locks name has one version, torch and
    torchvision included (the test command's pins, not in constraints.txt); and the GPU lock holds sglang's pins."""
    cpu, gpu = _lock(root, "constraints.txt"), _lock(root, "constraints-gpu.txt")
    differ = {n: (cpu[n], gpu[n]) for n in set(cpu) & set(gpu) if cpu[n] != gpu[n]}
    assert not differ, differ
    assert "torch" not in cpu and "torchvision" not in cpu, "command 1 takes torch 2.13.0: no torch in the lock"
    assert _test_command_torch(root) == {"torch": gpu["torch"], "torchvision": gpu["torchvision"]} \
        == {"torch": "2.14.1", "torchvision": "0.29.1"}
    for dist in ("transformers", "tokenizers", "kernels", "sglang"):
        assert cpu[dist] == gpu[dist], dist
    from packaging.requirements import Requirement

    env = {"sys_platform": "linux", "platform_machine": "x86_64", "python_version": "3.11", "extra": ""}
    for text in importlib.metadata.requires("sglang"):
        req = Requirement(text)
        if req.marker is None or req.marker.evaluate(env):
            name = req.name.lower().replace("_", "-")
            assert name in gpu and req.specifier.contains(gpu[name], prereleases=True), f"sglang wants {req}"


@pytest.mark.slow
def test_the_gpu_extra_resolves_for_python_311(root, tmp_path):
    """`pip install -c constraints-gpu.txt -e ".[gpu]"` as a GPU user runs it, resolved (not installed) here: the
    project's dependencies and its gpu extra, on this Python (3.11: sglang 0.5.23 requires >= 3.11) and
    platform (its wheels are manylinux_2_34: glibc >= 2.34). pip fetches metadata only."""
    import tomllib

    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    reqs = project["dependencies"] + project["optional-dependencies"]["gpu"]
    out = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "-q", "--report",
                          str(tmp_path / "report.json"), "-c", str(root / "constraints-gpu.txt"), *reqs],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    got = {i["metadata"]["name"].lower().replace("_", "-"): i["metadata"]["version"]
           for i in json.loads((tmp_path / "report.json").read_text())["install"]}
    assert got["sglang"] == "0.5.23" and got["torch"] == "2.14.1" and got["transformers"] == "5.19.0"
    assert got["kernels"].startswith("0.14.")
    assert project["requires-python"].startswith(">=3.11")
    sglang_python = importlib.metadata.metadata("sglang")["Requires-Python"]
    assert sglang_python == project["requires-python"].split()[0], (sglang_python, project["requires-python"])
