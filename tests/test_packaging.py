"""Project-level guards: our top-level `kernels/` must not pass for the PyPI `kernels` package, and the
README's test command is the one CI runs."""

import subprocess
import sys


def test_transformers_does_not_mistake_our_kernels_package(root):
    code = ("import kernels, kernels.chunked; from transformers.utils import is_kernels_available; "
            "import transformers.integrations.hub_kernels as hk; "
            "print(kernels.__file__); print(is_kernels_available())")
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    path, available = out.stdout.split()
    assert path.startswith(str(root / "kernels")), "our kernels/ is the one importable from the project root"
    assert available == "False", "transformers took our kernels/ for the hub `kernels` package"


def test_ci_runs_the_readme_test_command(root):
    readme = (root / "README.md").read_text()
    ci = (root / ".ci" / "run").read_text()
    command = next(line.strip() for line in ci.splitlines() if "pytest" in line and not line.startswith("#"))
    assert command in readme, f"the README must show the command CI runs: {command}"
