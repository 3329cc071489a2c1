"""The chunked kernels' extra memory does not grow with the number of tokens (docs/benchmark.md, "Performance: the
loss kernel"): forward + backward at N and at 4N tokens, each in a fresh process, peak resident set over the
resident set just before the step. A kernel that materialises the batch's `[N, V]` logits passes every numerical
test in tests/test_kernels.py and fails here: planted as "the whole batch as one chunk", all three cases failed
(3.6 GiB extra at 4N against 0.9 GiB at N); any `[N, V]` fp32 buffer adds 3N x V x 4 bytes (384 MiB) from N to 4N.

The CUDA twin (allocator peak, V = 151936, bf16 and fp32) is tests/gpu/test_kernel_memory_gpu.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

MIB = 1 << 20
V, D = 32768, 64  # the [V, d] fp32 weight gradient: 8 MiB
N = 1024  # and 4N = 4096: one [4N, V] fp32 block is 512 MiB (a planted [N, V] bug needs ~4 GiB at 4N)
# opd/kernels/chunked.py's "a few [chunk, V] fp32 blocks" as a number: 5 to 7 measured (2026-11, torch 2.13)
BLOCKS = 8

# Runs in a fresh `python -c` (cwd = the repository root). One thread: the measurement is about bytes, and the
# machine may be shared. Prints one JSON line.
_MEASURE = r"""
import ctypes, json, sys, time
import torch
torch.set_num_threads(1)
from opd.kernels.chunked import chunked_divergence, chunked_sampled_rkl

which, n, v, d, chunk = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
malloc_trim = getattr(ctypes.CDLL(None), "malloc_trim", None)  # glibc

def rss():
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024

def reset_peak():
    if malloc_trim is not None:
        malloc_trim(0)  # freed heap pages back to the system, so the baseline holds only live tensors
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # Linux: VmHWM := VmRSS

def inputs(rows):
    g = torch.Generator().manual_seed(0)
    h_s = (torch.randn(rows, d, generator=g) * 0.5).requires_grad_()
    w_s = (torch.randn(v, d, generator=g) * 0.05).requires_grad_()
    h_t = torch.randn(rows, d, generator=g) * 0.5
    w_t = torch.randn(v, d, generator=g) * 0.05
    ids = torch.randint(0, v, (rows,), generator=g)
    return h_s, w_s, h_t, w_t, ids, torch.ones(rows), torch.full((rows,), -3.0), torch.full((rows,), -2.5)

def step(h_s, w_s, h_t, w_t, ids, weights, teacher_lp, rollout_lp):
    if which == "divergence":
        loss, _ = chunked_divergence(h_s, w_s, h_t, w_t, weights, kind="rkl", num_tokens=h_s.shape[0],
                                     chunk_size=chunk)
    else:
        loss, _ = chunked_sampled_rkl(h_s, w_s, ids, teacher_lp, rollout_lp, weights, num_tokens=h_s.shape[0],
                                      chunk_size=chunk)
    return torch.autograd.grad(loss, [h_s, w_s])  # returned: the gradients are alive at the peak

# Warm-up on a few rows with fresh weights: autograd's and the kernel's lazily created state counts in the
# baseline, and nothing of the warm-up's size stays referenced.
warm = inputs(8)
step(*warm)
del warm
args = inputs(n)
reset_peak()
baseline, _ = rss()
t0 = time.perf_counter()
grads = step(*args)
seconds = time.perf_counter() - t0
_, peak = rss()
print(json.dumps({"n": n, "baseline_bytes": baseline, "peak_extra_bytes": peak - baseline, "step_s": seconds}))
"""


def _peak_extra(root, which: str, n: int, *, chunk: int, v: int = V, d: int = D) -> dict:
    # A fixed mmap threshold: every large block is its own mapping, returned to the system when freed, so the
    # resident set follows the live tensors (glibc's adaptive threshold would otherwise keep freed chunks
    # resident and let one step's garbage hide the next step's growth).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _MEASURE, which, str(n), str(v), str(d), str(chunk)], cwd=root,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _proc_can_reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


needs_linux_peak = pytest.mark.skipif(not _proc_can_reset_peak(),
                                      reason="needs Linux /proc/self/clear_refs to reset the peak resident set")


@needs_linux_peak
# 32 rows: a [chunk, V] block of 4 MiB, small enough beside the [V, d] terms for the 1/8 bound below.
@pytest.mark.parametrize("which,chunk", [("divergence", 32), ("divergence", 0), ("sampled_rkl", 32)],
                         ids=["divergence-chunk32", "divergence-auto", "sampled_rkl-chunk32"])
def test_chunked_extra_memory_does_not_grow_with_tokens(root, which, chunk):
    """Forward + backward (gradients for h_s and w_s), fp32, at N and 4N tokens, with a fixed chunk and with
    the automatic one (chunk_size=0, what the learner passes by default; 256 rows at this V and d).

    What may grow with N: the kernel keeps d loss / d h_s `[N, d]` fp32 from forward to backward, and backward
    returns a scaled copy `[N, d]`; so going from N to 4N may add 2 x 3N x d x 4 bytes (1.5 MiB at N = 1024,
    d = 64). Everything else the step allocates is per chunk (`[chunk, V]` fp32 blocks) or per vocabulary (the
    `[V, d]` weight gradient and its scaled copy). So:

    - growth: extra(4N) <= 1.1 x extra(N) + 4 MiB + that 1.5 MiB; 10 % and 4 MiB cover page rounding and
      allocator slack, while one more `[4N, V]` fp32 block is 512 MiB;
    - size: extra(4N) <= 8 `[chunk, V]` fp32 blocks + 2 `[V, d]` + 2 `[4N, d]` fp32;
    - at the fixed chunk of 32 rows, extra(4N) < 1/8 of the `[4N, V]` fp32 logits (64 MiB).
    """
    from opd.kernels.chunked import default_chunk_size

    rows = chunk or default_chunk_size(V, D, "cpu")
    small, large = _peak_extra(root, which, N, chunk=chunk), _peak_extra(root, which, 4 * N, chunk=chunk)
    growth = 2 * (4 * N - N) * D * 4
    e_small, e_large = small["peak_extra_bytes"], large["peak_extra_bytes"]
    summary = (f"{which}: V={V} d={D} chunk={rows}: peak extra {e_small / MIB:.1f} MiB at N={N} "
               f"({small['step_s']:.2f} s), {e_large / MIB:.1f} MiB at 4N={4 * N} ({large['step_s']:.2f} s); "
               f"allowed growth {growth / MIB:.1f} MiB")
    print(summary)
    assert_flat(summary, e_small, e_large, growth=growth, slack=(1.1, 4 * MIB),
                budget=BLOCKS * rows * V * 4 + 2 * V * D * 4 + 2 * 4 * N * D * 4,
                materialised=4 * N * V * 4 if chunk else None)


def assert_flat(summary: str, small: int, large: int, *, growth: int, slack: tuple[float, int], budget: int,
                materialised: int | None) -> None:
    """The bounds both twins (CPU RSS here, CUDA allocator in tests/gpu) put on the peak extra bytes at N
    (`small`) and 4N (`large`): growth no more than `slack` (relative, absolute) plus the bytes that legitimately
    grow with N; at most `budget` (the kernel's blocks); below 1/8 of the `[4N, V]` fp32 logits."""
    assert small > 0 and large > 0, summary
    assert large <= slack[0] * small + slack[1] + growth, f"extra memory grows with the token count: {summary}"
    assert large <= budget, f"more than {BLOCKS} [chunk, V] blocks ({budget / MIB:.0f} MiB): {summary}"
    if materialised is not None:
        assert large < materialised / 8, (f"extra memory is {large / materialised:.2f} of the [4N, V] fp32 "
                                          f"logits ({materialised / MIB:.0f} MiB): {summary}")
