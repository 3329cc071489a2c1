"""The house: every import points down its floors, and no modules import each other in a circle.

The floors, top to bottom, are written once, here. A module may import its own floor and the floors below; an
import inside a function counts like one at the top of the file (a lazy import still ties the two modules), and
so does `importlib.import_module("...")` with a literal name. README's Layout section lists the same folders in
the same order, and a line for every folder of opd/.
"""

from __future__ import annotations

import ast
import graphlib
import re
import subprocess
from pathlib import Path

import pytest

FLOORS = (  # (floor, the modules and packages on it: a module is on the floor of its longest listed prefix)
    ("programs", ("driver", "scripts", "opd.programs")),  # what a user runs: the loop, benchmark, side by side
    ("placement", ("opd.cluster",)),  # modes -> Ray: connect, placement group, the Actors facade
    ("actors", ("opd.actors",)),  # rollout, teacher, learner and their engines
    ("library", ("opd",)),  # config, batches, data, models, checkpoints, metrics, memory plan, doctor
    ("transport", ("opd.transport",)),  # tensors between processes: shared memory, IPC handles, collective groups
    ("kernels", ("opd.kernels",)),  # the losses: reference, chunked, Triton
)
FLOOR_OF = {top: i for i, (_, tops) in enumerate(FLOORS) for top in tops}


def floor_of(module: str) -> int | None:
    """The floor of a module: that of the longest prefix of its dotted name on FLOORS (None: on no floor)."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in FLOOR_OF:
            return FLOOR_OF[".".join(parts[:n])]
    return None


def project_modules(root: Path, files: list[str]) -> dict[str, Path]:
    """Module name -> file, for the project's Python files outside tests/."""
    modules = {}
    for name in files:
        if not name.endswith(".py") or name.startswith("tests/"):
            continue
        parts = name[:-3].split("/")
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = root / name
    return modules


def _targets(node: ast.AST, module: str, is_package: bool, modules: dict) -> list[str]:
    """The project modules one import statement (or importlib.import_module call) reaches."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:  # relative: from the module's package, up `level - 1` more
            package = module.split(".") if is_package else module.split(".")[:-1]
            package = package[:len(package) - (node.level - 1)]
            base = ".".join(package + ([base] if base else []))
        # `from pkg import name` reaches pkg.name when that is a module, else pkg itself
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
    elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
          and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
        names = [node.args[0].value]
    else:
        return []
    out = []
    for name in names:
        while name and name not in modules:  # `import a.b.c` of a module a.b with an attribute c
            name = name.rpartition(".")[0]
        if name:
            out.append(name)
    return out


def check_house(root: Path, files: list[str]) -> list[str]:
    """Every import that points up the floors, every module on no floor, and every circle; one line each."""
    modules = project_modules(root, files)
    problems, graph = [], {}
    for module, path in sorted(modules.items()):
        mine = floor_of(module)
        if mine is None:
            top = module.split(".")[0]
            problems.append(f"{path.relative_to(root)}: {top}/ is on no floor of the house (tests/test_layering.py)")
            continue
        graph[module] = set()
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            for target in _targets(node, module, path.name == "__init__.py", modules):
                theirs = floor_of(target)
                if target == module or theirs is None:
                    continue
                graph[module].add(target)
                if theirs < mine:
                    problems.append(f"{path.relative_to(root)}:{node.lineno}: {module} ({FLOORS[mine][0]}) imports "
                                    f"{target} ({FLOORS[theirs][0]}), a floor above it")
    try:
        tuple(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as e:
        problems.append(f"a circle of imports: {' -> '.join(reversed(e.args[1]))}")
    return problems


def _tracked(root: Path) -> list[str]:
    """The project's files: git's list in a clone, else every .py file outside hidden and virtual-env folders."""
    listed = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True)
    if listed.returncode == 0:
        return listed.stdout.split()
    return [str(p.relative_to(root)) for p in root.rglob("*.py")
            if not any(part.startswith(".") or part in ("build", "runs") for part in p.relative_to(root).parts)]


def test_every_import_points_down_the_house(root):
    problems = check_house(root, _tracked(root))
    assert not problems, "\n".join(problems)


def _tree(tmp_path: Path, files: dict[str, str]) -> list[str]:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return list(files)


def test_the_check_finds_an_upward_import_even_a_lazy_one(tmp_path):
    files = _tree(tmp_path, {"opd/__init__.py": "", "opd/config.py": "X = 1\n",
                             "opd/data.py": "def f():\n    from opd.cluster import topology\n",
                             "opd/cluster/__init__.py": "", "opd/cluster/topology.py": "from opd.config import X\n",
                             "opd/kernels/__init__.py": "", "opd/kernels/loss.py": "import importlib\n"
                             "m = importlib.import_module('opd.actors.learner')\n",
                             "opd/actors/__init__.py": "", "opd/actors/learner.py": "from . import common\n",
                             "opd/actors/common.py": "from .. import config\n",
                             "opd/transport/__init__.py": "", "opd/transport/x.py": "from ..kernels import loss\n"})
    problems = check_house(tmp_path, files)
    assert problems == [
        "opd/data.py:2: opd.data (library) imports opd.cluster.topology (placement), a floor above it",
        "opd/kernels/loss.py:2: opd.kernels.loss (kernels) imports opd.actors.learner (actors), a floor above it"]


def test_the_check_finds_a_circle_and_a_module_on_no_floor(tmp_path):
    files = _tree(tmp_path, {"opd/__init__.py": "", "opd/a.py": "from opd import b\n",
                             "opd/b.py": "def f():\n    import opd.c\n", "opd/c.py": "from opd.a import X\n",
                             "tools/run.py": "import opd.a\n"})
    problems = check_house(tmp_path, files)
    assert problems[0] == "tools/run.py: tools/ is on no floor of the house (tests/test_layering.py)"
    circle = re.fullmatch(r"a circle of imports: (.*)", problems[1]).group(1).split(" -> ")
    assert len(problems) == 2 and len(circle) == 4 and circle[0] == circle[-1] and set(circle) == {"opd.a", "opd.b",
                                                                                                  "opd.c"}


def readme_layout(root: Path) -> list[str]:
    """The entries of README.md's Layout block: the first word of each line that does not start with a space."""
    readme = (root / "README.md").read_text()
    layout = re.search(r"## Layout\n.*?```\n(.*?)```", readme, re.S)
    assert layout, "README.md has a ## Layout section with a code block"
    return re.findall(r"^(\S+)\s", layout.group(1), re.M)


def test_readme_layout_lists_the_floors_top_to_bottom(root):
    listed = [re.sub(r"(/|\.py)$", "", entry).replace("/", ".") for entry in readme_layout(root)]
    expected = [top for _, tops in FLOORS for top in tops] + ["tests"]
    listed = [name for name in listed if name in expected]  # deeper folders (opd/actors/engines/): the next test
    assert listed == expected, "README's Layout lists the folders floor by floor, as tests/test_layering.py's FLOORS"


def test_readme_layout_names_every_package_folder_of_opd_floor_by_floor(root):
    """Every folder of opd/ that holds Python modules has a line of its own in the Layout, every folder the Layout
    names exists, and the lines go down the floors (top floor first). Modules are not checked: they come and go."""
    entries = readme_layout(root)
    folders = [entry for entry in entries if entry.endswith("/")]
    missing = [f for f in folders if not (root / f).is_dir()]
    assert not missing, f"README's Layout names folders that do not exist: {missing}"
    packages = sorted({f"{p.parent.relative_to(root).as_posix()}/" for p in (root / "opd").rglob("*.py")})
    unnamed = [p for p in packages if p not in folders]
    assert not unnamed, f"README's Layout has no line for {unnamed}"
    floors = [(entry, floor_of(re.sub(r"(/|\.py)$", "", entry).replace("/", "."))) for entry in entries]
    floors = [(entry, floor) for entry, floor in floors if floor is not None]
    assert [f for _, f in floors] == sorted(f for _, f in floors), (
        "README's Layout goes down the floors of tests/test_layering.py, top first: "
        + ", ".join(f"{entry} ({FLOORS[floor][0]})" for entry, floor in floors))


@pytest.mark.parametrize("path", ["driver.py", "opd/programs/train.py", "opd/actors", "opd/cluster"])
def test_files_and_functions_stay_short(root, path):
    """driver.py, the loop, opd/actors/ and opd/cluster/: no file over 400 lines, no function over 60."""
    files = [root / path] if path.endswith(".py") else sorted((root / path).rglob("*.py"))
    long = []
    for file in files:
        text = file.read_text()
        if len(text.splitlines()) > 400:
            long.append(f"{file.relative_to(root)}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long.append(f"{file.relative_to(root)}:{node.lineno} {node.name}: "
                            f"{node.end_lineno - node.lineno + 1} lines")
    assert long == []
