"""Speed and peak memory of the distillation loss: materialised reference vs chunked (vs peers if installed).

    python -m opd.kernels.bench                                   # CPU grid: N in {1k, 4k}, V in {32k, 152k}, d 256
    python -m opd.kernels.bench --n 4096 --v 32000 --d 256 --out bench.json
    python -m opd.kernels.bench --device cuda --dtype bfloat16 --n 1024 4096 16384 --d 1536

Each measurement runs in a fresh subprocess so that one case's allocations cannot hide another's: forward +
backward of the loss (student hidden states and output weight get gradients), median of `--repeats` after one
warm-up. Peak extra memory is what the step needs beyond its inputs: on CPU the rise of the process's peak
resident set (`ru_maxrss`) over its resident set just before the step; on CUDA `max_memory_allocated` minus
the memory allocated before it. Cases whose estimated reference footprint does not fit are skipped and say so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

IMPLEMENTATIONS = ("reference", "chunked", "chunked_torch", "liger")


def _loss_fn(impl: str, kind: str, num_tokens: int, chunk_size: int):
    """The loss as a function of (h_s, w_s, h_t, w_t), or None when that peer is not installed."""
    if impl == "reference":
        from opd.kernels.reference import distill_loss

        return lambda h_s, w_s, h_t, w_t, ones: distill_loss(h_s, w_s, h_t, w_t, ones, kind=kind,
                                                              num_tokens=num_tokens)
    if impl in ("chunked", "chunked_torch"):  # chunked: Triton rows on CUDA; chunked_torch: torch rows always
        from opd.kernels.chunked import chunked_divergence

        backend = "torch" if impl == "chunked_torch" else "auto"
        return lambda h_s, w_s, h_t, w_t, ones: chunked_divergence(h_s, w_s, h_t, w_t, ones, kind=kind,
                                                                    num_tokens=num_tokens, chunk_size=chunk_size,
                                                                    backend=backend)[0]
    if impl == "liger":  # Liger's fused linear JSD: beta 0 / 1 are its forward / reverse KL
        try:
            from liger_kernel.transformers import LigerFusedLinearJSD
        except ImportError:
            return None
        beta = {"fkl": 0.0, "rkl": 1.0, "jsd": 0.5}[kind]
        jsd = LigerFusedLinearJSD(jsd_beta=beta)
        return lambda h_s, w_s, h_t, w_t, ones: jsd(h_s, w_s, h_t, w_t)
    raise ValueError(f"unknown implementation {impl!r}: use one of {IMPLEMENTATIONS}")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_mark(device: str) -> int:
    if device == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def measure(impl: str, n: int, v: int, d: int, kind: str, dtype: str, device: str, repeats: int,
            chunk_size: int) -> dict:
    """One case, in a fresh process: peak extra bytes of the first forward + backward, then the median time
    of `repeats` more."""
    fn = _loss_fn(impl, kind, n, chunk_size)
    if fn is None:
        return {"skipped": f"{impl} is not installed"}
    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    # Load libraries, kernels and autograd threads on a tiny case first: their memory is not the step's.
    tiny = [torch.randn(8, d, device=device).to(dt).requires_grad_(), torch.randn(64, d, device=device).to(dt)]
    tiny_loss = fn(tiny[0], tiny[1].requires_grad_(), tiny[0].detach(), tiny[1].detach(), torch.ones(8, device=device))
    torch.autograd.grad(tiny_loss, tiny)
    h_s = (torch.randn(n, d, device=device) * 0.5).to(dt).requires_grad_()
    w_s = (torch.randn(v, d, device=device) * 0.05).to(dt).requires_grad_()
    h_t = (torch.randn(n, d, device=device) * 0.5).to(dt)
    w_t = (torch.randn(v, d, device=device) * 0.05).to(dt)
    ones = torch.ones(n, device=device)

    def step() -> None:
        loss = fn(h_s, w_s, h_t, w_t, ones)
        torch.autograd.grad(loss, [h_s, w_s])
        if device == "cuda":
            torch.cuda.synchronize()  # the host waits for the kernels, so the timing covers them

    # ru_maxrss only ever rises: the first step after the inputs exist is the one whose peak is readable.
    before = torch.cuda.memory_allocated() if device == "cuda" else _rss_bytes()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    step()
    first = time.perf_counter() - t0
    peak = _peak_mark(device) - before
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"time_s": statistics.median(times), "times_s": times, "first_s": first, "peak_extra_bytes": int(peak)}


def _fits(impl: str, n: int, v: int, device: str) -> bool:
    # The reference keeps ~10 fp32 [N, V] tensors alive (logits, log-probs, probabilities, their grads).
    need = 10 * n * v * 4 if impl == "reference" else 2 * v * 1024 * 4
    if device == "cuda":
        free = torch.cuda.mem_get_info()[0]
    else:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return need < 0.7 * free


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
                if not _fits(impl, n, v, args.device):
                    case["skipped"] = "does not fit in memory"
                else:
                    cmd = [sys.executable, "-m", "opd.kernels.bench", "--single", "--impl", impl, "--n", str(n), "--v",
                           str(v), "--d", str(args.d), "--kind", args.kind, "--device", args.device, "--dtype",
                           args.dtype, "--repeats", str(args.repeats), "--chunk-size", str(args.chunk_size),
                           "--threads", str(args.threads)]
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
