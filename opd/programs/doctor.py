"""Can this machine run each mode, and if not, why: `python -m opd.programs.doctor [--gpu] [--json]` (or
`opd doctor`).

    python -m opd.programs.doctor         # versions, GPUs and driver, NCCL, the sampler rollout.sampler=auto picks,
                                          # and whether cpu / colocated / split run
    python -m opd.programs.doctor --gpu   # and micro-checks on the GPU: CUDA IPC between two processes, a one-GPU
                                          # NCCL communicator, the Triton loss kernel at V=151936, GEMM and memory
                                          # roofs, FlashInfer sampling (opd/programs/doctor_gpu.py)
    python -m opd.programs.doctor --json  # the same checks as JSON

Each line is `ok`, `FAIL` (with the fix on the next line) or `--` (not checked here, and why). It needs only torch
and transformers: Ray, sglang, triton, FlashInfer and cupy are looked up without being required. The exit status
is 1 when a check failed.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict

from opd.programs.doctor_checks import Check, device_checks, mode_checks, package_checks
from opd.programs.doctor_gpu import gpu_checks


def run_checks(gpu: bool = False) -> list[Check]:
    checks = package_checks()
    checks += device_checks()
    checks += mode_checks(checks)
    if gpu:
        checks += gpu_checks()
    else:
        checks.append(Check("gpu micro-checks", "skip", "not run: python -m opd.programs.doctor --gpu"))
    return checks


def format_checks(checks: list[Check]) -> str:
    mark = {"ok": "ok", "fail": "FAIL", "skip": "--"}
    lines = [f"opd doctor ({time.strftime('%Y-%m-%d')}, {platform.system()} {platform.machine()}): can this machine "
             f"run each mode?"]
    for c in checks:
        lines.append(f"  {mark[c.status]:<5} {c.name:<17} {c.detail}")
        if c.fix and c.status != "ok":
            lines.append(f"  {'':<5} {'':<17} fix: {c.fix}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m opd.programs.doctor", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="run the GPU micro-checks too")
    parser.add_argument("--json", action="store_true", help="print the checks as JSON")
    args = parser.parse_args(argv)
    checks = run_checks(gpu=args.gpu)
    print(json.dumps([asdict(c) for c in checks], indent=1) if args.json else format_checks(checks))
    return 1 if any(c.status == "fail" for c in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
