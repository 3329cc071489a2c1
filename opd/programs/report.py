"""`opd report RUN_DIR` (or `python -m opd.programs.report RUN_DIR`): write RUN_DIR/report.html (opd/report.py)
again for any run directory, finished or not."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from opd import report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="opd report", description="Write RUN_DIR/report.html from a run directory.")
    ap.add_argument("run_dir")
    args = ap.parse_args(argv)
    run_dir = Path(args.run_dir)
    if not (run_dir / "config.json").is_file():
        print(f"error: {run_dir}: not a run directory (no config.json); runs are in run.out_dir (runs/)",
              file=sys.stderr)
        return 2
    print(report.write(run_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
