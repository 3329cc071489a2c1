"""Render a run's report.html in headless Chromium (the OS package) and save a screenshot to look at.

    python scripts/check_report.py runs/<name> [--out report.png] [--chromium /usr/bin/chromium]

Writes the report again first (opd/report.py), then checks what the browser built (`--dump-dom`): every section
heading, one <svg> per learning curve, the summary's numbers equal to eval.jsonl's; exits 1 naming what is
missing. The screenshot is for a person: the page must be readable, the curves drawn, nothing cut off.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("--out", default="", help="the screenshot (default: RUN_DIR/report.png)")
    ap.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    ap.add_argument("--size", default="1300,3000", help="window width,height in pixels")
    args = ap.parse_args(argv)
    from opd import report
    from opd.metrics import read_jsonl

    run_dir = Path(args.run_dir).resolve()
    page = report.write(run_dir)
    out = Path(args.out or run_dir / "report.png").resolve()
    with tempfile.TemporaryDirectory(prefix="opd-chromium-") as profile:
        flags = [args.chromium, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
                 "--hide-scrollbars", f"--window-size={args.size}"]
        shot = subprocess.run([*flags, f"--screenshot={out}", page.as_uri()], capture_output=True, text=True,
                              timeout=120)
        dom = subprocess.run([*flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    problems = []
    if shot.returncode != 0 or not out.is_file():
        problems.append(f"no screenshot (chromium rc {shot.returncode}): {shot.stderr[-500:]}")
    text = dom.stdout
    for heading in ("Summary", "Learning curves", "Checkpoints", "Config"):
        if f"<h2>{heading}</h2>" not in text:
            problems.append(f"section {heading!r} missing from the rendered page")
    curves = text.count("<figure>")
    if curves < 5 or text.count("<svg") < curves:
        problems.append(f"{curves} figures and {text.count('<svg')} SVGs rendered (5 curves expected)")
    evals = read_jsonl(run_dir / "eval.jsonl")
    if evals:
        last = f"{evals[-1]['eval/kl/reverse/mean']:.4f}"
        if last not in text:
            problems.append(f"the last held-out reverse KL {last} is not on the page")
    for p in problems:
        print(f"problem: {p}")
    print(f"{'FAILED' if problems else 'ok'}: {page} rendered by {args.chromium}; screenshot {out}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
