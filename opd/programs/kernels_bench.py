"""The loss kernels' benchmark: speed and peak memory of the reference, the chunked loss and installed peers.

    python -m opd.programs.kernels_bench                         # CPU grid: N in {1k, 4k}, V in {32k, 152k}, d 256
    python -m opd.programs.kernels_bench --n 4096 --v 32000 --d 256 --out bench.json
    python -m opd.programs.kernels_bench --device cuda --dtype bfloat16 --n 1024 4096 16384 --d 1536

(or `opd kernels-bench ...`). Each case runs in a fresh subprocess (this program with --single) so that one case's
allocations cannot hide another's; how a case is measured is opd/kernels/bench.py's `measure`. Writes
runs/kernel_bench.json by default.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from opd.kernels.bench import IMPLEMENTATIONS, fits, measure


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="+", default=[1024, 4096], help="tokens")
    parser.add_argument("--v", type=int, nargs="+", default=[32000, 151936], help="vocabulary rows")
    parser.add_argument("--d", type=int, default=256, help="hidden size (both sides)")
    parser.add_argument("--kind", default="rkl", choices=("fkl", "rkl", "jsd"))
    parser.add_argument("--impl", nargs="+", choices=IMPLEMENTATIONS,
                        help="default: all; on CPU chunked_torch is chunked and is left out")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk-size", type=int, default=0, help="chunked: tokens per chunk (0 = automatic)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, default=Path("runs/kernel_bench.json"))
    parser.add_argument("--single", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.impl is None:
        args.impl = [i for i in IMPLEMENTATIONS if args.device == "cuda" or i != "chunked_torch"]
    if args.single:  # child process: one case, its JSON on the last line
        torch.set_num_threads(args.threads)
        print(json.dumps(measure(args.impl[0], args.n[0], args.v[0], args.d, args.kind, args.dtype, args.device,
                                 args.repeats, args.chunk_size)))
        return 0

    rows = []
    for v in args.v:
        for n in args.n:
            for impl in args.impl:
                case = {"impl": impl, "n": n, "v": v, "d": args.d, "kind": args.kind, "dtype": args.dtype,
                        "device": args.device}
                if not fits(impl, n, v, args.device):
                    case["skipped"] = "does not fit in memory"
                else:
                    cmd = [sys.executable, "-m", "opd.programs.kernels_bench", "--single", "--impl", impl, "--n",
                           str(n), "--v", str(v), "--d", str(args.d), "--kind", args.kind, "--device", args.device,
                           "--dtype", args.dtype, "--repeats", str(args.repeats), "--chunk-size",
                           str(args.chunk_size), "--threads", str(args.threads)]
                    out = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2])
                    if out.returncode != 0:
                        case["skipped"] = "failed: " + (out.stderr.strip().splitlines() or ["?"])[-1]
                    else:
                        case.update(json.loads(out.stdout.strip().splitlines()[-1]))
                rows.append(case)
                print(_format_row(case), flush=True)
    _print_ratios(rows)
    report = {"date": time.strftime("%Y-%m-%d"), "machine": platform.platform(), "cpus": os.cpu_count(),
              "torch": torch.__version__, "threads": args.threads,
              "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None, "results": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


def _format_row(case: dict) -> str:
    head = f"{case['impl']:>10} N={case['n']:>6} V={case['v']:>6} d={case['d']:>5}"
    if "skipped" in case:
        return f"{head}  skipped: {case['skipped']}"
    peak = case.get("peak_extra_bytes")
    peak_s = f"{peak / 2**20:9.1f} MiB" if peak is not None else "        ?"
    return f"{head}  {case['time_s'] * 1e3:9.1f} ms  peak extra {peak_s}"


def _print_ratios(rows: list[dict]) -> None:
    by = {(r["impl"], r["n"], r["v"]): r for r in rows if "skipped" not in r}
    print("\nchunked / reference (same run):")
    for (impl, n, v), r in sorted(by.items()):
        ref = by.get(("reference", n, v))
        if impl == "reference" or ref is None:
            continue
        mem = (r["peak_extra_bytes"] / ref["peak_extra_bytes"]
               if r.get("peak_extra_bytes") and ref.get("peak_extra_bytes") else float("nan"))
        print(f"  {impl:>8} N={n:>6} V={v:>6}: time x{r['time_s'] / ref['time_s']:.2f}, peak memory x{mem:.3f}")


if __name__ == "__main__":
    sys.exit(main())
