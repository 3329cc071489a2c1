"""Triton kernel for the per-row work of the chunked divergence (opd/kernels/chunked.py): one program per row.

Given one chunk of raw student and teacher logits `[C, V]`, each program streams its row through the
vocabulary in `BLOCK_V` tiles, three times:

    pass 1  online max / sum-exp of s = z_s / T and t = z_t / T        -> (max, log-sum-exp offset) per side
    pass 2  log p = (s - max_s) - lse_s, log q likewise; the divergence, the stats (fkl, rkl, entropy) and,
            for rkl / jsd, the row scalar the gradient subtracts (rkl itself, or KL(p || m))
    pass 3  the gradient wrt the raw student logits, written over the student row in place

so a chunk costs three reads of both rows and one write, with no `[C, V]` fp32 temporaries. The gradient math
is the one in opd/kernels/chunked.py's docstring (p = p_S, q = p_T, s = z / T):

    fkl  d/ds = p - q
    rkl  d/ds = p * (log p - log q - rkl)
    jsd  d/ds = (1 - b) * p * (log p - log m - KL(p || m)),   m = b q + (1 - b) p

times `weight_i * grad_scale / T` (chain rule through s = z / T and the weighted, scaled sum of rows).

Numerics: everything is fp32 whatever the input dtype. Log-probabilities are formed as `(s - max) - lse_off`
with `lse_off = log sum exp(s - max)`, like `torch.log_softmax`; `s - logsumexp(s)` loses ~1e-4 once logits
reach ~190 (docs NOTES). `s = z / T` uses IEEE division so it is bit-identical to the torch reference.
Columns >= `valid_vocab` are -inf on both sides: they are never loaded, carry no probability and get a zero
gradient.

`ref_row_divergence` is the same row function in plain torch (materialised log_softmax + autograd): the oracle
for tests/test_triton_kl.py and tests/gpu/test_triton_kl_gpu.py.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from opd.kernels.reference import KINDS, divergence, entropy

try:  # triton is optional on CPU machines (pyproject's `gpu` extra); the torch reference works without it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Kind codes, resolved on the host so the kernel specialises on a constexpr (jsd with beta 0/1 -> fkl/rkl).
_FKL, _RKL, _JSD = 0, 1, 2
_DEFAULT_BLOCK_V = 4096


def _resolve_kind(kind: str, beta: float) -> int:
    if kind not in KINDS:
        raise ValueError(f"unknown loss kind {kind!r}: use one of {KINDS}")
    if kind == "jsd" and not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must lie in [0, 1] for jsd, got {beta}")
    if kind == "fkl" or (kind == "jsd" and beta == 0.0):
        return _FKL
    if kind == "rkl" or (kind == "jsd" and beta == 1.0):
        return _RKL
    return _JSD


if triton is not None:

    # One @triton.jit body is one GPU program: kept whole (98 lines), as splitting it costs registers and readability.
    @triton.jit
    def _row_divergence_kernel(
        student_ptr, teacher_ptr, weights_ptr, rows_ptr, stats_ptr,
        V, valid_vocab, temperature, beta, log_beta, log_1m_beta, grad_coef,
        KIND: tl.constexpr, COMPUTE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        row = tl.program_id(0)
        # int64 offsets: C * V exceeds 2**31 for a chunk of a few thousand rows at V ~ 152k.
        s_row = student_ptr + row.to(tl.int64) * V
        t_row = teacher_ptr + row.to(tl.int64) * V
        offs = tl.arange(0, BLOCK_V)

        # ---- pass 1: online max and sum-exp of both rows (columns < valid_vocab only) ----------------------
        # The loop stops at valid_vocab, so every tile holds at least one finite column and the running max is
        # finite after the first tile (exp(-inf - finite) = 0 rescales the empty initial sum harmlessly).
        m_s = -float("inf")
        m_t = -float("inf")
        sum_s = 0.0
        sum_t = 0.0
        for start in range(0, valid_vocab, BLOCK_V):
            cols = start + offs
            valid = cols < valid_vocab
            s = tl.math.div_rn(tl.load(s_row + cols, mask=valid, other=-float("inf")).to(tl.float32), temperature)
            t = tl.math.div_rn(tl.load(t_row + cols, mask=valid, other=-float("inf")).to(tl.float32), temperature)
            new_m_s = tl.maximum(m_s, tl.max(s, axis=0))
            new_m_t = tl.maximum(m_t, tl.max(t, axis=0))
            sum_s = sum_s * tl.exp(m_s - new_m_s) + tl.sum(tl.exp(s - new_m_s), axis=0)
            sum_t = sum_t * tl.exp(m_t - new_m_t) + tl.sum(tl.exp(t - new_m_t), axis=0)
            m_s = new_m_s
            m_t = new_m_t
        # log p = (s - m_s) - lse_s: the shifted form keeps fp32 accuracy for large logits.
        lse_s = tl.log(sum_s)
        lse_t = tl.log(sum_t)

        # ---- pass 2: divergence, stats and the gradient's row scalar -------------------------------------
        fkl = 0.0  # KL(q || p)
        rkl = 0.0  # KL(p || q)
        ent = 0.0  # -sum p log p
        kl_q_m = 0.0  # jsd only: KL(q || m)
        kl_p_m = 0.0  # jsd only: KL(p || m)
        for start in range(0, valid_vocab, BLOCK_V):
            cols = start + offs
            valid = cols < valid_vocab
            s = tl.math.div_rn(tl.load(s_row + cols, mask=valid, other=0.0).to(tl.float32), temperature)
            t = tl.math.div_rn(tl.load(t_row + cols, mask=valid, other=0.0).to(tl.float32), temperature)
            # Masked lanes get probability 0 (the where on p, q) so their terms vanish without nan.
            logp = (s - m_s) - lse_s
            logq = (t - m_t) - lse_t
            p = tl.where(valid, tl.exp(logp), 0.0)
            q = tl.where(valid, tl.exp(logq), 0.0)
            fkl += tl.sum(q * (logq - logp), axis=0)
            rkl += tl.sum(p * (logp - logq), axis=0)
            ent -= tl.sum(p * logp, axis=0)
            if KIND == 2:
                # log m = logaddexp(log b + log q, log(1-b) + log p), stable form.
                a = logq + log_beta
                b = logp + log_1m_beta
                hi = tl.maximum(a, b)
                logm = hi + tl.log(1.0 + tl.exp(tl.minimum(a, b) - hi))
                kl_q_m += tl.sum(q * (logq - logm), axis=0)
                kl_p_m += tl.sum(p * (logp - logm), axis=0)
        if KIND == 0:
            loss = fkl
        elif KIND == 1:
            loss = rkl
        else:
            loss = beta * kl_q_m + (1.0 - beta) * kl_p_m
        tl.store(rows_ptr + row, loss)
        tl.store(stats_ptr + row * 3 + 0, fkl)
        tl.store(stats_ptr + row * 3 + 1, rkl)
        tl.store(stats_ptr + row * 3 + 2, ent)

        # ---- pass 3: gradient wrt the raw student logits, in place ---------------------------------------
        if COMPUTE_GRAD:
            # d loss / d z = weight * grad_scale / T * d row / d s
            scale = tl.load(weights_ptr + row).to(tl.float32) * grad_coef
            for start in range(0, V, BLOCK_V):
                cols = start + offs
                in_row = cols < V
                valid = cols < valid_vocab
                s = tl.math.div_rn(tl.load(s_row + cols, mask=valid, other=0.0).to(tl.float32), temperature)
                t = tl.math.div_rn(tl.load(t_row + cols, mask=valid, other=0.0).to(tl.float32), temperature)
                logp = (s - m_s) - lse_s
                logq = (t - m_t) - lse_t
                p = tl.exp(logp)
                if KIND == 0:
                    g = p - tl.exp(logq)
                elif KIND == 1:
                    g = p * (logp - logq - rkl)
                else:
                    a = logq + log_beta
                    b = logp + log_1m_beta
                    hi = tl.maximum(a, b)
                    logm = hi + tl.log(1.0 + tl.exp(tl.minimum(a, b) - hi))
                    g = (1.0 - beta) * p * (logp - logm - kl_p_m)
                # Padded columns (>= valid_vocab) were -inf logits: exactly zero gradient.
                g = tl.where(valid, g * scale, 0.0)
                # Each tile is read (above) before it is overwritten, and only by this program: in place is safe.
                tl.store(s_row + cols, g.to(student_ptr.dtype.element_ty), mask=in_row)


def _check_inputs(student_CV: Tensor, teacher_CV: Tensor, weights_C: Tensor, temperature: float,
                  valid_vocab: int) -> None:
    if student_CV.ndim != 2 or student_CV.shape != teacher_CV.shape:
        raise ValueError(f"student and teacher logits must both be [C, V], got {tuple(student_CV.shape)} and "
                         f"{tuple(teacher_CV.shape)}")
    if weights_C.shape != (student_CV.shape[0],):
        raise ValueError(f"weights_C must be [C] = [{student_CV.shape[0]}], got {tuple(weights_C.shape)}")
    if not (student_CV.is_contiguous() and teacher_CV.is_contiguous()):
        raise ValueError("student_CV and teacher_CV must be contiguous (the kernel walks rows of stride V); "
                         "call .contiguous() first")
    for name, x in (("student_CV", student_CV), ("teacher_CV", teacher_CV)):
        if x.dtype not in _DTYPES:
            raise ValueError(f"{name} dtype {x.dtype} is not supported: use one of {_DTYPES}")
    if not student_CV.device == teacher_CV.device == weights_C.device:
        raise ValueError(f"inputs on different devices: {student_CV.device}, {teacher_CV.device}, "
                         f"{weights_C.device}")
    if not 1 <= valid_vocab <= student_CV.shape[1]:
        raise ValueError(f"valid_vocab must lie in [1, V={student_CV.shape[1]}], got {valid_vocab}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def row_divergence_(student_CV: Tensor, teacher_CV: Tensor, weights_C: Tensor, *, kind: str, beta: float,
                    temperature: float, valid_vocab: int, grad_scale: float, compute_grad: bool = True,
                    block_v: int | None = None) -> tuple[Tensor, Tensor]:
    """Per-row divergence of one chunk, and (in place) its gradient wrt the raw student logits.

    student_CV, teacher_CV: raw logits `[C, V]`, contiguous, fp32 / bf16 / fp16 (computed in fp32); columns
    >= valid_vocab are treated as -inf on both sides. weights_C: per-row weights `[C]`.
    Returns `rows` `[C]` fp32 (unweighted divergence of `kind`, see opd/kernels/reference.py) and `stats` `[C, 3]`
    fp32 (unweighted forward KL, reverse KL, student entropy per row).
    If compute_grad, overwrites student_CV (in its own dtype) with d/dz of `sum_i weights_i * rows_i *
    grad_scale`; padded columns get 0. block_v: vocabulary tile (power of two), None = automatic.
    """
    code = _resolve_kind(kind, beta)
    _check_inputs(student_CV, teacher_CV, weights_C, temperature, valid_vocab)
    if triton is None:
        raise ImportError("row_divergence_ needs triton (pip install triton); ref_row_divergence needs only torch")
    num_rows, vocab = student_CV.shape
    block_v = block_v or min(_DEFAULT_BLOCK_V, triton.next_power_of_2(valid_vocab))
    if block_v & (block_v - 1):
        raise ValueError(f"block_v must be a power of two, got {block_v}")
    rows = torch.empty(num_rows, dtype=torch.float32, device=student_CV.device)
    stats = torch.empty(num_rows, 3, dtype=torch.float32, device=student_CV.device)
    if num_rows == 0:
        return rows, stats
    # beta is used only by jsd; its logs are host constants (jsd excludes beta in {0, 1}, so both are finite).
    log_beta, log_1m_beta = (math.log(beta), math.log1p(-beta)) if code == _JSD else (0.0, 0.0)
    _row_divergence_kernel[(num_rows,)](
        student_CV, teacher_CV, weights_C.float().contiguous(), rows, stats,
        vocab, valid_vocab, float(temperature), float(beta), log_beta, log_1m_beta,
        float(grad_scale) / float(temperature),
        KIND=code, COMPUTE_GRAD=bool(compute_grad), BLOCK_V=block_v,
        num_warps=8 if block_v >= 2048 else 4,
        # Op-for-op like the torch reference (no FMA contraction); the kernel is memory-bound, so it costs
        # nothing, and passing it silences Triton 3.9's "TRITON_DEFAULT_FP_FUSION is unset" warning.
        enable_fp_fusion=False,
    )
    return rows, stats


def ref_row_divergence(student_CV: Tensor, teacher_CV: Tensor, weights_C: Tensor, *, kind: str, beta: float,
                       temperature: float, valid_vocab: int, grad_scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """The same row function on materialised fp32 log_softmax, gradient by autograd (slow; test oracle).

    Returns rows `[C]`, stats `[C, 3]` (fkl, rkl, entropy) and the gradient `[C, V]` fp32 of
    `sum_i weights_i * rows_i * grad_scale` wrt the raw student logits. Does not modify its inputs.
    """
    _resolve_kind(kind, beta)
    _check_inputs(student_CV, teacher_CV, weights_C, temperature, valid_vocab)
    z = student_CV.detach().float().requires_grad_()
    teacher = teacher_CV.detach().float()
    common = dict(temperature=temperature, valid_vocab=valid_vocab)
    with torch.enable_grad():
        rows = divergence(z, teacher, kind=kind, beta=beta, **common)
        (grad,) = torch.autograd.grad((rows * weights_C.float()).sum() * grad_scale, z)
    with torch.no_grad():
        stats = torch.stack([divergence(z, teacher, kind="fkl", **common),
                             divergence(z, teacher, kind="rkl", **common),
                             entropy(z, **common)], dim=1)
    return rows.detach(), stats, grad
