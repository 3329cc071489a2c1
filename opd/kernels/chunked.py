"""Fused output projection + divergence, chunked over tokens, never materialising `[N, V]` logits.

Per chunk of tokens the forward pass computes both logit blocks, the divergence and its gradient with respect
to the student logits, and immediately folds that gradient into the gradients of the student hidden states
and output weight. Backward only scales the stored gradients by the incoming scalar. Extra peak memory is a
few `[chunk, V]` fp32 blocks, independent of N.

Gradients with respect to the scaled student logits `s = z / T` (p = p_S, q = p_T, all row-wise):

    fkl = sum q (log q - log p)          d/ds = p - q
    rkl = sum p (log p - log q)          d/ds = p * (log p - log q - rkl)
    jsd = b KL(q||m) + (1-b) KL(p||m)    d/ds = (1-b) * p * (log p - log m - KL(p||m))

(for jsd, dL/dp_j = (1-b)(log p_j - log m_j) because the m-terms cancel; the softmax Jacobian then subtracts
the p-weighted mean). Chain rule through `s = z / T` multiplies by 1/T.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

# Elements of one [chunk, V] fp32 block: 16 MiB on CPU, 256 MiB on GPU, where the Triton kernel runs one program
# per row and needs hundreds of rows to fill the SMs.
_CHUNK_ELEMENTS = {"cpu": 1 << 22, "cuda": 1 << 26}


def default_chunk_size(vocab: int, hidden: int = 1024, device: str = "cpu") -> int:
    """Tokens per chunk: a power of two, as large as the device's [chunk, V] block budget allows, but never so
    small that the [chunk, d] x [d, V] products re-read the output weight for a handful of rows (measured on
    CPU at V=152k, d=256: chunks of 16 rows made the matmuls 5x slower than chunks of 256; docs/LOG.md).
    Depends on V and d only, so the extra memory is O(chunk x V) whatever the number of tokens."""
    budget = _CHUNK_ELEMENTS.get(device, _CHUNK_ELEMENTS["cpu"])
    by_memory = 1 << max(0, int(math.floor(math.log2(max(1, budget // vocab)))))
    by_reuse = min(256, max(32, 1 << int(math.ceil(math.log2(max(1, (1 << 15) // hidden))))))
    return max(by_memory, by_reuse)


def _row_function(device: torch.device, backend: str):
    """backend "auto": the Triton kernel on CUDA when triton is installed, the torch rows otherwise (same
    contract); "torch" or "triton" force one (tests run "triton" on CPU under TRITON_INTERPRET=1)."""
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend={backend!r} is unknown: use auto, torch or triton")
    if backend == "torch" or (backend == "auto" and device.type != "cuda"):
        return torch_row_divergence_
    try:
        from opd.kernels.triton_kl import row_divergence_
    except ImportError:
        if backend == "triton":
            raise
        return torch_row_divergence_
    return row_divergence_


def _no_autocast(fn):
    """Runs `fn` with autocast off on the device of its first tensor argument. The learner computes its loss inside
    `torch.autocast(dtype=bfloat16)` (learner.compute_dtype=bfloat16), which would turn every fp32 `@` here into a
    bf16 GEMM: the log-prob canary, sampled_rkl's ratios and the hybrid's cross-entropy would lose their fp32
    accumulation, and operand_dtype=float32 would not be fp32. The kernels choose their operands' dtype themselves.
    Applied to each autograd Function's forward and backward (as torch.amp.custom_fwd/custom_bwd do, for any
    device) and to the plain functions."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        device = next(a for a in args if isinstance(a, Tensor)).device.type
        with torch.autocast(device, enabled=False):
            return fn(*args, **kwargs)

    return run


def _rowdot(a_CV: Tensor, b_CV: Tensor, scratch_CV: Tensor) -> Tensor:
    """sum_v a[c, v] * b[c, v] per row: the product into `scratch_CV`, then torch's row sum.

    Not `einsum("cv,cv->c")`: that batched matmul accumulates in fp32 blocks, which at V=151936 put 1.5e-4
    (relative, against float64) on the loss and 9e-4 on grad_h (rkl; the row scalars feed the gradient);
    `.sum(-1)` sums pairwise. The product needs a [C, V] block, so the caller lends one it holds anyway:
    writing into it is also faster than einsum, and twice as fast as allocating `a * b` (docs/LOG.md).
    """
    return torch.mul(a_CV, b_CV, out=scratch_CV).sum(-1)


def _log_softmax_and_softmax(z_CV: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """log softmax(z / T) and softmax(z / T) per row, fp32, as two new [C, V] blocks (z is not modified).

    Not `torch.log_softmax(z).exp()`: on CPU its sum of exponentials accumulates in fp32 vector lanes, which at
    V=151936 shifted whole rows of log p by up to 1.6e-6 against float64 (3e-7 with `.sum(-1)` here). A shift
    of log p_S that log p_T does not share is an absolute error of the divergence, large beside a small KL.
    Shifted form, as in opd/kernels/triton_kl.py: log p = (s - max) - log sum exp(s - max), and p = e / sum e.
    """
    s = z_CV.to(torch.float32, copy=True)
    if temperature != 1.0:
        s.div_(temperature)  # IEEE division: the same s = z / T as the Triton kernel's and the reference's
    logp = s.sub_(s.amax(dim=-1, keepdim=True))
    p = logp.exp()
    sum_exp = p.sum(dim=-1, keepdim=True)
    p.div_(sum_exp)
    logp.sub_(sum_exp.log_())
    return logp, p


def torch_row_divergence_(student_CV: Tensor, teacher_CV: Tensor, weights_C: Tensor, *, kind: str, beta: float,
                          temperature: float, grad_scale: float, compute_grad: bool = True) -> tuple[Tensor, Tensor]:
    """The per-row work in torch (any device): returns per-row divergence `[C]` and per-row (forward KL,
    reverse KL, student entropy) `[C, 3]`, unweighted, and overwrites `student_CV` with
    d(sum_i weights_i * rows_i * grad_scale) / d(student logits). All columns are valid here (the caller cut
    the vocabulary). Same contract as opd/kernels/triton_kl.py's `row_divergence_`.

    Written for memory traffic: every [C, V] pass costs about the same, so the row sums' products and then the
    gradient are built in one scratch block, the student's own buffer when it is fp32 and may be overwritten.
    """
    logp_s, p_s = _log_softmax_and_softmax(student_CV, temperature)
    logp_t, p_t = _log_softmax_and_softmax(teacher_CV, temperature)
    log_ratio = logp_s.sub(logp_t)  # log p_S - log p_T
    # The row sums' scratch block: the student's logits are not read again, and the gradient overwrites them
    # anyway. compute_grad=False must leave them untouched and a bf16 buffer cannot hold fp32 products: then
    # one more [C, V] block (a bf16 gradient is built in it as well).
    in_place = compute_grad and student_CV.dtype == torch.float32
    out = student_CV if in_place else torch.empty_like(log_ratio)
    rkl, fkl = _rowdot(p_s, log_ratio, out), -_rowdot(p_t, log_ratio, out)
    stats = torch.stack([fkl, rkl, -_rowdot(p_s, logp_s, out)], dim=-1)
    coef = (weights_C.float() * (grad_scale / temperature))[:, None]  # chain rule through s = z / T
    if kind == "fkl" or (kind == "jsd" and beta == 0.0):
        rows = fkl
        if compute_grad:
            torch.sub(p_s, p_t, out=out).mul_(coef)
    elif kind == "rkl" or (kind == "jsd" and beta == 1.0):
        rows = rkl
        if compute_grad:
            torch.sub(log_ratio, rkl[:, None], out=out).mul_(p_s).mul_(coef)
    else:
        log_m = torch.logaddexp(logp_t + math.log(beta), logp_s + math.log1p(-beta))
        log_ratio_m = logp_s.sub_(log_m)  # logp_s is not needed any more: reuse its memory
        kl_s_m = _rowdot(p_s, log_ratio_m, out)
        rows = beta * _rowdot(p_t, logp_t.sub_(log_m), out) + (1 - beta) * kl_s_m
        if compute_grad:
            torch.sub(log_ratio_m, kl_s_m[:, None], out=out).mul_(p_s).mul_(coef * (1 - beta))
    if compute_grad and out is not student_CV:
        student_CV.copy_(out)
    return rows, stats


class _GradsInForward(torch.autograd.Function):
    """Shared by the chunked losses: forward already computed d loss / d h_s and d loss / d w_s (the loss is
    scalar), so backward only scales them by the incoming gradient. The first two inputs are h_s and w_s."""

    @staticmethod
    def finish(ctx, h_s, w_s, loss, stats, grad_h, grad_w, num_inputs: int):
        ctx.mark_non_differentiable(stats)
        ctx.num_inputs = num_inputs
        if grad_h is not None:
            ctx.save_for_backward(grad_h.to(h_s.dtype), grad_w.to(w_s.dtype))
        return loss, stats

    @staticmethod
    @_no_autocast
    def backward(ctx, grad_loss, _grad_stats):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_loss, grad_w * grad_loss, *([None] * (ctx.num_inputs - 2))


def _operand(t: Tensor, dtype: torch.dtype) -> Tensor:
    """`t` as a GEMM operand of `dtype`. fp32: widened. bf16 on CUDA: bf16 (tensor cores; `_mm` asks for an fp32
    result). bf16 on CPU, which has no bf16 GEMM with an fp32 result: the bf16 values widened to fp32, so the
    products are those of the bf16 operands, accumulated in fp32, as on the GPU."""
    if dtype == torch.float32:
        return t.float()
    t = t.to(dtype)
    return t if t.is_cuda else t.float()


def _mm(a: Tensor, b: Tensor) -> Tensor:
    """a @ b with an fp32 result; bf16 operands accumulate in fp32 (cuBLAS through torch.mm's out_dtype)."""
    return a @ b if a.dtype == torch.float32 else torch.mm(a, b, out_dtype=torch.float32)


def _addmm_(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc += a @ b in place, acc fp32 (the weight gradient: no [V, d] temporary per chunk)."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    else:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)


class ChunkedDivergence(_GradsInForward):
    @staticmethod
    @_no_autocast
    def forward(ctx, h_s, w_s, h_t, w_t, weights, kind, beta, temperature, valid_vocab, num_tokens,
                chunk_size, needs_grad, backend, operand_dtype):
        num_rows = h_s.shape[0]
        # Columns >= valid_vocab would be -inf on both sides: leaving them out of the matmul is the same
        # softmax, and their weight rows get exactly zero gradient.
        # Logits and divergences in fp32 (DESIGN.md): the GEMMs' operands in `operand_dtype` (fp32, or bf16 with
        # fp32 accumulation and fp32 results); the weights are converted once, not per chunk.
        ws, wt = _operand(w_s[:valid_vocab], operand_dtype), _operand(w_t[:valid_vocab], operand_dtype)
        grad_h = torch.zeros_like(h_s, dtype=torch.float32) if needs_grad else None
        grad_w = torch.zeros_like(w_s, dtype=torch.float32) if needs_grad else None
        loss = torch.zeros((), dtype=torch.float32, device=h_s.device)
        stats = torch.zeros(3, dtype=torch.float32, device=h_s.device)  # weighted sums: fkl, rkl, entropy
        row_divergence = _row_function(h_s.device, backend)
        extra = {"valid_vocab": valid_vocab} if row_divergence is not torch_row_divergence_ else {}
        for start in range(0, num_rows, chunk_size):
            end = min(start + chunk_size, num_rows)
            hs, w = _operand(h_s[start:end], operand_dtype), weights[start:end].float()
            logits_s = _mm(hs, ws.T)  # [C, V] fp32; becomes d loss / d logits in place
            rows, row_stats = row_divergence(logits_s, _mm(_operand(h_t[start:end], operand_dtype), wt.T), w,
                                             kind=kind, beta=beta, temperature=temperature,
                                             grad_scale=1.0 / num_tokens, compute_grad=needs_grad, **extra)
            loss += rows @ w
            stats += w @ row_stats
            if needs_grad:
                grad_logits = _operand(logits_s, operand_dtype)  # fp32: the same tensor
                grad_h[start:end] = _mm(grad_logits, ws)
                _addmm_(grad_w[:valid_vocab], grad_logits.T, hs)
        return _GradsInForward.finish(ctx, h_s, w_s, loss / num_tokens, stats, grad_h, grad_w, num_inputs=14)


def chunked_divergence(h_s_Nd: Tensor, w_s_Vd: Tensor, h_t_Nd: Tensor, w_t_Vd: Tensor, weights_N: Tensor, *,
                       kind: str, num_tokens: float, beta: float = 0.5, temperature: float = 1.0,
                       valid_vocab: int | None = None, chunk_size: int = 0, backend: str = "auto",
                       operand_dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """Loss `sum_i weight_i * D_i / num_tokens` (see opd/kernels/reference.py) and detached weighted sums
    `[3]` of forward KL, reverse KL and student entropy (divide by the token count for means).

    h_s_Nd: student final hidden states; w_s_Vd: student output weight (gets a gradient, tied or not);
    h_t_Nd, w_t_Vd: teacher hidden states and output weight (no gradient); weights_N: per-token weights;
    valid_vocab: the tokenizer's size (<= both row counts); chunk_size: tokens per chunk, 0 = automatic;
    backend: the per-row work in "torch" or "triton" (opd/kernels/triton_kl.py); "auto" = Triton on CUDA;
    operand_dtype: the projections' operands (torch.bfloat16: bf16 GEMMs accumulating in fp32 with fp32 logits;
    softmax, divergences and the gradients' accumulators are fp32 either way).
    """
    assert h_s_Nd.shape[0] == h_t_Nd.shape[0] == weights_N.shape[0], "one row per response token"
    assert operand_dtype in (torch.float32, torch.bfloat16), operand_dtype
    valid_vocab = min(w_s_Vd.shape[0], w_t_Vd.shape[0]) if valid_vocab is None else valid_vocab
    assert valid_vocab <= min(w_s_Vd.shape[0], w_t_Vd.shape[0])
    chunk_size = chunk_size or default_chunk_size(valid_vocab, h_s_Nd.shape[1], h_s_Nd.device.type)
    needs_grad = torch.is_grad_enabled() and (h_s_Nd.requires_grad or w_s_Vd.requires_grad)
    return ChunkedDivergence.apply(h_s_Nd, w_s_Vd, h_t_Nd.detach(), w_t_Vd.detach(), weights_N, kind, beta,
                                   temperature, valid_vocab, float(num_tokens), chunk_size, needs_grad, backend,
                                   operand_dtype)


@torch.no_grad()
@_no_autocast
def chunked_token_logprobs(h_Nd: Tensor, w_Vd: Tensor, token_ids_N: Tensor, *, temperature: float = 1.0,
                           valid_vocab: int | None = None, chunk_size: int = 0) -> Tensor:
    """log softmax(h @ w.T / T)[token] per row `[N]` fp32, one `[chunk, V]` block at a time (no gradient)."""
    valid_vocab = w_Vd.shape[0] if valid_vocab is None else valid_vocab
    chunk_size = chunk_size or default_chunk_size(valid_vocab, h_Nd.shape[1], h_Nd.device.type)
    w = w_Vd[:valid_vocab].float()
    out = torch.empty(h_Nd.shape[0], dtype=torch.float32, device=h_Nd.device)
    for start in range(0, h_Nd.shape[0], chunk_size):
        end = min(start + chunk_size, h_Nd.shape[0])
        z = (h_Nd[start:end].float() @ w.T) / temperature
        out[start:end] = z.gather(1, token_ids_N[start:end, None]).squeeze(1) - torch.logsumexp(z, dim=-1)
    return out


class ChunkedCrossEntropy(_GradsInForward):
    """Cross-entropy of given tokens (the hybrid's gold prefix): loss = sum_t w_t * -log p_S(y_t) / num_tokens at
    temperature 1, one `[chunk, V]` block at a time; d loss / d z = (w_t / num_tokens) * (p_S - onehot(y_t))."""

    @staticmethod
    @_no_autocast
    def forward(ctx, h_s, w_s, token_ids, weights, valid_vocab, num_tokens, chunk_size, needs_grad):
        ws = w_s[:valid_vocab].float()
        grad_h = torch.zeros_like(h_s, dtype=torch.float32) if needs_grad else None
        grad_w = torch.zeros_like(w_s, dtype=torch.float32) if needs_grad else None
        loss = torch.zeros((), dtype=torch.float32, device=h_s.device)
        for start in range(0, h_s.shape[0], chunk_size):
            end = min(start + chunk_size, h_s.shape[0])
            hs, w, ids = h_s[start:end].float(), weights[start:end].float(), token_ids[start:end]
            logp = torch.log_softmax(hs @ ws.T, dim=-1)  # [C, V]
            loss -= logp.gather(1, ids[:, None]).squeeze(1) @ w
            if needs_grad:
                g = w / num_tokens
                grad_z = logp.exp_().mul_(g[:, None])  # g p_S ...
                grad_z.scatter_add_(1, ids[:, None], -g[:, None])  # ... - g onehot(y)
                grad_h[start:end] = grad_z @ ws
                grad_w[:valid_vocab].addmm_(grad_z.T, hs)
        stats = loss.detach().clone().view(1)  # the weighted sum of -log p_S(y)
        return _GradsInForward.finish(ctx, h_s, w_s, loss / num_tokens, stats, grad_h, grad_w, num_inputs=8)


def chunked_cross_entropy(h_s_Nd: Tensor, w_s_Vd: Tensor, token_ids_N: Tensor, weights_N: Tensor, *,
                          num_tokens: float, valid_vocab: int | None = None,
                          chunk_size: int = 0) -> tuple[Tensor, Tensor]:
    """Loss `sum_t w_t * -log softmax(h_t @ w.T)[y_t] / num_tokens` and the detached weighted sum of the
    negative log-likelihoods `[1]`, without the `[N, V]` logits."""
    valid_vocab = w_s_Vd.shape[0] if valid_vocab is None else valid_vocab
    chunk_size = chunk_size or default_chunk_size(valid_vocab, h_s_Nd.shape[1], h_s_Nd.device.type)
    needs_grad = torch.is_grad_enabled() and (h_s_Nd.requires_grad or w_s_Vd.requires_grad)
    return ChunkedCrossEntropy.apply(h_s_Nd, w_s_Vd, token_ids_N, weights_N, valid_vocab, float(num_tokens),
                                     chunk_size, needs_grad)


class ChunkedSampledRKL(_GradsInForward):
    """Sampled-token reverse KL (see opd/kernels/reference.py `sampled_rkl_loss`) in one pass over token chunks.

    d loss / d log p_S(y_t) = g_t = -(w_t / num_tokens) * A_t * r_t where the unclipped branch is the minimum
    (0 where the clipped one is); d log p_S(y_t) / d z = (onehot(y_t) - p_S) / T.
    """

    @staticmethod
    @_no_autocast
    def forward(ctx, h_s, w_s, token_ids, teacher_logprobs, rollout_logprobs, weights, temperature, clip_ratio,
                valid_vocab, num_tokens, chunk_size, needs_grad):
        ws = w_s[:valid_vocab].float()
        grad_h = torch.zeros_like(h_s, dtype=torch.float32) if needs_grad else None
        grad_w = torch.zeros_like(w_s, dtype=torch.float32) if needs_grad else None
        loss = torch.zeros((), dtype=torch.float32, device=h_s.device)
        # weighted sums: advantage (= -sampled reverse KL), ratio, clipped tokens; and max |log r|
        stats = torch.zeros(4, dtype=torch.float32, device=h_s.device)
        for start in range(0, h_s.shape[0], chunk_size):
            end = min(start + chunk_size, h_s.shape[0])
            hs, w, ids = h_s[start:end].float(), weights[start:end].float(), token_ids[start:end]
            logp = torch.log_softmax(hs @ ws.T / temperature, dim=-1)  # [C, V]
            logp_y = logp.gather(1, ids[:, None]).squeeze(1)
            advantage = teacher_logprobs[start:end].float() - logp_y
            log_ratio = logp_y - rollout_logprobs[start:end].float()
            ratio = log_ratio.exp()
            clipped = ratio.clamp(1 - clip_ratio, 1 + clip_ratio) * advantage
            unclipped = ratio * advantage
            loss -= torch.minimum(unclipped, clipped) @ w
            active = unclipped <= clipped  # where the gradient flows through the ratio
            stats += torch.stack([advantage @ w, ratio @ w, (~active).float() @ w, torch.zeros(())])
            stats[3] = torch.maximum(stats[3], log_ratio.abs().max())
            if needs_grad:
                g = -(w / num_tokens) * advantage * ratio * active  # [C] d loss / d log p_S(y)
                grad_z = logp.exp_().mul_(-g[:, None])  # -g p_S ...
                grad_z.scatter_add_(1, ids[:, None], g[:, None])  # ... + g onehot(y)
                grad_z.div_(temperature)
                grad_h[start:end] = grad_z @ ws
                grad_w[:valid_vocab].addmm_(grad_z.T, hs)
        return _GradsInForward.finish(ctx, h_s, w_s, loss / num_tokens, stats, grad_h, grad_w, num_inputs=12)


def chunked_sampled_rkl(h_s_Nd: Tensor, w_s_Vd: Tensor, token_ids_N: Tensor, teacher_logprobs_N: Tensor,
                        rollout_logprobs_N: Tensor, weights_N: Tensor, *, num_tokens: float, temperature: float = 1.0,
                        clip_ratio: float = 0.2, valid_vocab: int | None = None,
                        chunk_size: int = 0) -> tuple[Tensor, Tensor]:
    """Loss and detached stats `[4]`: weighted sums of the advantage log p_T(y) - log p_S(y), of the
    importance ratio and of clipped tokens, and the max |log p_S(y) - log p_rollout(y)| (the canary)."""
    valid_vocab = w_s_Vd.shape[0] if valid_vocab is None else valid_vocab
    chunk_size = chunk_size or default_chunk_size(valid_vocab, h_s_Nd.shape[1], h_s_Nd.device.type)
    needs_grad = torch.is_grad_enabled() and (h_s_Nd.requires_grad or w_s_Vd.requires_grad)
    return ChunkedSampledRKL.apply(h_s_Nd, w_s_Vd, token_ids_N, teacher_logprobs_N.detach(),
                                   rollout_logprobs_N.detach(), weights_N, temperature, clip_ratio, valid_vocab,
                                   float(num_tokens), chunk_size, needs_grad)
