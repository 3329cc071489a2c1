"""Speed and peak memory of the distillation loss, one case at a time: materialised reference vs chunked (vs peers
if installed). The grid of cases and its report are the program opd/programs/kernels_bench.py (`opd kernels-bench`).

Each measurement runs in a fresh subprocess so that one case's allocations cannot hide another's: forward +
backward of the loss (student hidden states and output weight get gradients), median of `--repeats` after one
warm-up. Peak extra memory is what the step needs beyond its inputs: on CPU the rise of the process's peak
resident set (`ru_maxrss`) over its resident set just before the step; on CUDA `max_memory_allocated` minus
the memory allocated before it. Cases whose estimated reference footprint does not fit are skipped and say so.
"""

from __future__ import annotations

import os
import resource
import statistics
import time

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


def fits(impl: str, n: int, v: int, device: str) -> bool:
    # The reference keeps ~10 fp32 [N, V] tensors alive (logits, log-probs, probabilities, their grads).
    need = 10 * n * v * 4 if impl == "reference" else 2 * v * 1024 * 4
    if device == "cuda":
        free = torch.cuda.mem_get_info()[0]
    else:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return need < 0.7 * free
