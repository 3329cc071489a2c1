"""opd/kernels/triton_kl.py compiled on one CUDA GPU at a realistic size (Qwen2.5's vocabulary), against the torch
reference. The CPU interpreter runs of the same comparisons live in tests/test_triton_kl.py."""

from __future__ import annotations

import pytest
import torch
from gpu_deps import needs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs 1 CUDA GPU")
needs("triton")  # the GPU loss kernel: on a CUDA machine a missing or broken triton fails here

from opd.kernels.triton_kl import ref_row_divergence, row_divergence_  # noqa: E402  (after the skip)

# Qwen2.5-0.5B/1.5B/3B: 151936 output rows, 151646 tokenizer entries (the rest are padding, -inf here).
C, V, VALID_VOCAB = 64, 151936, 151646
KINDS = [("fkl", 0.5), ("rkl", 0.5), ("jsd", 0.5), ("jsd", 0.2), ("jsd", 0.0), ("jsd", 1.0)]
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _inputs(dtype, num_rows=C, offset_s=0.0, offset_t=0.0, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    student = (torch.randn(num_rows, V, generator=g, device="cuda") * 3 + offset_s).to(dtype)
    teacher = (torch.randn(num_rows, V, generator=g, device="cuda") * 3 + offset_t).to(dtype)
    weights = (torch.rand(num_rows, generator=g, device="cuda") > 0.25).float() * 1.5  # some rows masked
    return student, teacher, weights


def _report(name, got, want, tol, atol=0.0):
    diff = (got.float() - want.float()).abs()
    bad = diff > tol * want.float().abs() + atol
    assert not bad.any(), (f"{name}: {int(bad.sum())} of {bad.numel()} elements differ, max {diff.max():.3e} "
                           f"at {tuple(int(i) for i in torch.nonzero(bad)[0])}")


def _check(student, teacher, weights, dtype, valid_vocab=VALID_VOCAB, **kw):
    kw = dict(valid_vocab=valid_vocab, grad_scale=1.0 / 1000, **kw)
    want_rows, want_stats, want_grad = ref_row_divergence(student, teacher, weights, **kw)
    buf = student.clone()
    rows, stats = row_divergence_(buf, teacher, weights, **kw)
    _report("rows", rows, want_rows, 1e-5, atol=1e-5)
    _report("stats", stats, want_stats, 1e-5, atol=1e-5)
    tol = TOL[dtype]
    _report("grad", buf, want_grad, tol, atol=0.1 * tol * float(want_grad.abs().max()))
    assert not buf[:, valid_vocab:].any(), "padded columns must get exactly zero gradient"
    assert not buf[weights == 0].any(), "zero-weight rows must get exactly zero gradient"


@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("kind,beta", KINDS)
def test_kernel_matches_reference_cuda(kind, beta, dtype):
    _check(*_inputs(dtype), dtype, kind=kind, beta=beta, temperature=1.7)


@pytest.mark.parametrize("kind,beta", [("fkl", 0.5), ("rkl", 0.5), ("jsd", 0.5)])
def test_large_logits_cuda(kind, beta):
    # Logits near +200 / -150: log-probs must be formed after subtracting the row max.
    _check(*_inputs(torch.float32, offset_s=200.0, offset_t=-150.0), torch.float32, kind=kind, beta=beta,
           temperature=1.0)


def test_no_grad_leaves_student_untouched_cuda():
    student, teacher, weights = _inputs(torch.bfloat16)
    buf = student.clone()
    row_divergence_(buf, teacher, weights, kind="jsd", beta=0.5, temperature=1.0, valid_vocab=VALID_VOCAB,
                    grad_scale=1.0, compute_grad=False)
    assert torch.equal(buf, student)


def test_int64_row_offsets_cuda():
    """C * V > 2**31 elements: the last rows must still be read and written at the right place."""
    num_rows = (2**31) // V + 8  # ~4.3 GB per bf16 [C, V] tensor
    if torch.cuda.get_device_properties(0).total_memory < 24 * 2**30:
        pytest.skip("needs ~10 GB of GPU memory")
    student, teacher, weights = _inputs(torch.bfloat16, num_rows=num_rows)
    weights[-4:] = 1.0
    kw = dict(kind="rkl", beta=0.5, temperature=1.0, valid_vocab=VALID_VOCAB, grad_scale=1.0)
    tail_s, tail_t = student[-4:].clone(), teacher[-4:].clone()
    rows, stats = row_divergence_(student, teacher, weights, **kw)
    want_rows, want_stats, want_grad = ref_row_divergence(tail_s, tail_t, weights[-4:], **kw)
    _report("rows", rows[-4:], want_rows, 1e-5, atol=1e-5)
    _report("stats", stats[-4:], want_stats, 1e-5, atol=1e-5)
    _report("grad", student[-4:], want_grad, 2e-2, atol=2e-3 * float(want_grad.abs().max()))
