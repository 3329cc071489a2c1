"""`opd`: one command for everything a run needs (the console script of pyproject.toml).

    opd train [--preset NAME] [--config FILE] [--set a.b=v ...]   # python driver.py ...
    opd bench [same options]                                     # python driver.py --bench ...
    opd report runs/<name>                                       # runs/<name>/report.html, written again
    opd memory --preset NAME --gpu-gib 80                        # the memory plan of a config on a device
    opd kernels-bench ...                                        # the loss kernels' benchmark
    opd side-by-side                                             # this project and TRL's GKD, side by side
    opd doctor [--gpu] [--json]                                  # can this machine run each mode, and why not

`python driver.py ...` and `ray job submit -- $PWD/.venv/bin/python driver.py ...` keep working as they are.
"""

from __future__ import annotations

import importlib
import sys


# command -> (the module whose main() runs it, arguments put before the user's); imported only when used
COMMANDS = {"train": ("opd.programs.train", []), "bench": ("opd.programs.train", ["--bench"]),
            "report": ("opd.programs.report", []), "memory": ("opd.programs.memory_plan", []),
            "kernels-bench": ("opd.programs.kernels_bench", []), "side-by-side": ("opd.programs.side_by_side", []),
            "doctor": ("opd.programs.doctor", [])}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"error: opd {command}: no such command; use one of {', '.join(COMMANDS)} (opd --help)",
              file=sys.stderr)
        return 2
    module, prefix = COMMANDS[command]
    return importlib.import_module(module).main([*prefix, *rest])


if __name__ == "__main__":
    sys.exit(main())
