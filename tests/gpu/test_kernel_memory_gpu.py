"""The chunked kernels' extra GPU memory does not grow with the number of tokens, at Qwen2.5's vocabulary
(151936 output rows), fp32 and bf16, the Triton and the torch rows: the CUDA twin of tests/test_kernel_memory.py.
Peak extra = `max_memory_allocated` during forward + backward minus `memory_allocated` just before it. A kernel
that materialises the `[4N, V]` logits needs ~130 GB at 4N and fails here by running out of memory, if not by
the bounds."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from gpu_deps import needs
from opd.kernels.chunked import chunked_divergence, chunked_sampled_rkl

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from test_kernel_memory import assert_flat  # noqa: E402  (tests/ on the path: the CPU twin's bounds)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs 1 CUDA GPU")

MIB = 1 << 20
V, D, CHUNK = 151936, 256, 128  # one [CHUNK, V] fp32 block: 74 MiB; one [V, D] fp32 tensor: 148 MiB
N = 8192  # and 4N = 32768: one [4N, V] fp32 block is 18.5 GiB
BLOCKS = 8  # opd/kernels/chunked.py's "a few [chunk, V] fp32 blocks", as a number (as in the CPU twin)


def _require_triton() -> None:
    needs("triton")  # missing or broken on this CUDA machine: fail, or the GPU path goes untested


def _peak_extra(which: str, n: int, dtype: torch.dtype, backend: str) -> int:
    g = torch.Generator(device="cuda").manual_seed(0)
    h_s = (torch.randn(n, D, device="cuda", generator=g) * 0.5).to(dtype).requires_grad_()
    w_s = (torch.randn(V, D, device="cuda", generator=g) * 0.05).to(dtype).requires_grad_()
    h_t = (torch.randn(n, D, device="cuda", generator=g) * 0.5).to(dtype)
    w_t = (torch.randn(V, D, device="cuda", generator=g) * 0.05).to(dtype)
    ids = torch.randint(0, V, (n,), device="cuda", generator=g)
    weights = torch.ones(n, device="cuda")
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    if which == "divergence":
        loss, _ = chunked_divergence(h_s, w_s, h_t, w_t, weights, kind="rkl", num_tokens=n, chunk_size=CHUNK,
                                     backend=backend)
    else:
        loss, _ = chunked_sampled_rkl(h_s, w_s, ids, torch.full((n,), -3.0, device="cuda"),
                                      torch.full((n,), -2.5, device="cuda"), weights, num_tokens=n,
                                      chunk_size=CHUNK)
    grads = torch.autograd.grad(loss, [h_s, w_s])  # alive at the peak, as in training
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - baseline
    del grads, loss, h_s, w_s, h_t, w_t, ids, weights
    torch.cuda.empty_cache()
    return extra


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("which,backend", [("divergence", "triton"), ("divergence", "torch"),
                                           ("sampled_rkl", "torch")])
def test_chunked_extra_gpu_memory_does_not_grow_with_tokens(which, backend, dtype):
    """Forward + backward (gradients for h_s and w_s) at N and 4N tokens, chunk fixed at 128 rows.

    What may grow with N: d loss / d h_s `[N, d]` in fp32, its copy in the input's dtype (saved for backward)
    and backward's scaled copy: at most three `[N, d]` fp32, so N -> 4N may add 3 x 3N x d x 4 bytes (72 MiB
    here). The rest is per chunk (`[chunk, V]` fp32 blocks) or per vocabulary (fp32 copies of bf16 output
    weights, the `[V, d]` weight gradient in fp32, in the input's dtype, scaled: at most five `[V, d]` fp32).
    So: extra(4N) <= 1.05 x extra(N) + 8 MiB + that growth (the allocator rounds to 512 bytes; one more
    `[4N, V]` fp32 block would be 18.5 GiB); extra(4N) <= 8 blocks + 5 `[V, d]` + 3 `[4N, d]` fp32;
    extra(4N) < 1/8 of the `[4N, V]` fp32 logits.
    """
    if backend == "triton":
        _require_triton()
    _peak_extra(which, 2 * CHUNK, dtype, backend)  # warm-up: Triton compilation, cuBLAS workspaces
    small, large = _peak_extra(which, N, dtype, backend), _peak_extra(which, 4 * N, dtype, backend)
    growth = 3 * (4 * N - N) * D * 4
    summary = (f"{which} {backend} {dtype}: V={V} d={D} chunk={CHUNK}: peak extra {small / MIB:.1f} MiB at "
               f"N={N}, {large / MIB:.1f} MiB at 4N={4 * N}; allowed growth {growth / MIB:.1f} MiB")
    print(summary)
    assert_flat(summary, small, large, growth=growth, slack=(1.05, 8 * MIB),
                budget=BLOCKS * CHUNK * V * 4 + 5 * V * D * 4 + 3 * 4 * N * D * 4, materialised=4 * N * V * 4)
