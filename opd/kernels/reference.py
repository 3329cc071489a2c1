"""The distillation losses on fully materialised fp32 logits: slow, obviously right, the test oracle.

With `p_S = softmax(student_logits / T)` and `p_T = softmax(teacher_logits / T)` over the valid vocabulary
(columns >= `valid_vocab` are -inf on both sides, so they carry no probability):

    fkl = KL(p_T || p_S)      rkl = KL(p_S || p_T)
    jsd = beta * KL(p_T || m) + (1 - beta) * KL(p_S || m),   m = beta * p_T + (1 - beta) * p_S
          (beta = 0 is fkl and beta = 1 is rkl, as in TRL's GKD)

The batch loss is `sum_i weight_i * divergence_i / num_tokens`; the caller passes `num_tokens`, the number of
response tokens of the *global* batch, so that micro-batches and chunks add up to the same loss.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

KINDS = ("fkl", "rkl", "jsd")


def masked_log_softmax(logits_NV: Tensor, temperature: float, valid_vocab: int) -> Tensor:
    z = logits_NV.float() / temperature
    column = torch.arange(z.shape[-1], device=z.device)
    return torch.log_softmax(z.masked_fill(column >= valid_vocab, float("-inf")), dim=-1)


def _kl(logp_NV: Tensor, logq_NV: Tensor) -> Tensor:
    """KL(p || q) per row; columns where p is 0 (masked) contribute 0."""
    # Where p is 0 the log-ratio is (-inf) - (-inf); zero it *before* multiplying so that autograd never
    # sees a nan either.
    log_ratio = torch.where(torch.isneginf(logp_NV), torch.zeros_like(logp_NV), logp_NV - logq_NV)
    return (torch.exp(logp_NV) * log_ratio).sum(-1)


def divergence(student_logits_NV: Tensor, teacher_logits_NV: Tensor, *, kind: str, beta: float = 0.5,
               temperature: float = 1.0, valid_vocab: int | None = None) -> Tensor:
    """Per-token divergence `[N]` fp32 between student and teacher logits `[N, V]`."""
    if kind not in KINDS:
        raise ValueError(f"unknown loss kind {kind!r}: use one of {KINDS}")
    valid_vocab = student_logits_NV.shape[-1] if valid_vocab is None else valid_vocab
    logp_s = masked_log_softmax(student_logits_NV, temperature, valid_vocab)
    logp_t = masked_log_softmax(teacher_logits_NV, temperature, valid_vocab)
    if kind == "fkl" or (kind == "jsd" and beta == 0.0):
        return _kl(logp_t, logp_s)
    if kind == "rkl" or (kind == "jsd" and beta == 1.0):
        return _kl(logp_s, logp_t)
    # Masked columns are -inf on both sides; give logsumexp finite stand-ins there (their terms are zeroed in
    # _kl) so that its backward pass stays finite.
    masked = torch.isneginf(logp_s)
    finite_t, finite_s = logp_t.masked_fill(masked, 0.0), logp_s.masked_fill(masked, 0.0)
    log_m = torch.logsumexp(torch.stack([finite_t + math.log(beta), finite_s + math.log1p(-beta)]), dim=0)
    return beta * _kl(logp_t, log_m) + (1 - beta) * _kl(logp_s, log_m)


def entropy(student_logits_NV: Tensor, *, temperature: float = 1.0, valid_vocab: int | None = None) -> Tensor:
    valid_vocab = student_logits_NV.shape[-1] if valid_vocab is None else valid_vocab
    logp = masked_log_softmax(student_logits_NV, temperature, valid_vocab)
    return -(torch.exp(logp) * torch.where(torch.isneginf(logp), torch.zeros_like(logp), logp)).sum(-1)


def distill_loss(h_s_Nd: Tensor, w_s_Vd: Tensor, h_t_Nd: Tensor, w_t_Vd: Tensor, weights_N: Tensor, *,
                 kind: str, num_tokens: float, beta: float = 0.5, temperature: float = 1.0,
                 valid_vocab: int | None = None) -> Tensor:
    """The learner's loss with both logit matrices materialised `[N, V]` (V_s and V_t may differ: each side
    is cut or -inf-padded to the larger width, then columns >= valid_vocab are masked)."""
    width = max(w_s_Vd.shape[0], w_t_Vd.shape[0])
    valid_vocab = min(w_s_Vd.shape[0], w_t_Vd.shape[0]) if valid_vocab is None else valid_vocab
    student = _pad_columns(h_s_Nd.float() @ w_s_Vd.float().T, width)
    teacher = _pad_columns(h_t_Nd.float() @ w_t_Vd.float().T, width)
    per_token = divergence(student, teacher, kind=kind, beta=beta, temperature=temperature,
                           valid_vocab=valid_vocab)
    return (per_token * weights_N.float()).sum() / num_tokens


def _pad_columns(logits_NV: Tensor, width: int) -> Tensor:
    if logits_NV.shape[-1] == width:
        return logits_NV
    pad = logits_NV.new_full((logits_NV.shape[0], width - logits_NV.shape[-1]), float("-inf"))
    return torch.cat([logits_NV, pad], dim=-1)


def sampled_rkl_loss(h_s_Nd: Tensor, w_s_Vd: Tensor, token_ids_N: Tensor, teacher_logprobs_N: Tensor,
                     rollout_logprobs_N: Tensor, weights_N: Tensor, *, num_tokens: float, temperature: float = 1.0,
                     clip_ratio: float = 0.2, valid_vocab: int | None = None) -> Tensor:
    """The sampled-token reverse-KL estimator, materialised.

    Per response token y_t: advantage A_t = log p_T(y_t) - log p_S(y_t), detached (its expectation under p_S
    is -KL(p_S || p_T)); importance ratio r_t = p_S(y_t) / p_rollout(y_t); PPO-clipped surrogate
    loss = -sum_t w_t min(r_t A_t, clip(r_t, 1 - eps, 1 + eps) A_t) / num_tokens.
    On-policy (r = 1) its gradient is E[(log p_S - log p_T) grad log p_S], the reverse-KL policy gradient.
    """
    valid_vocab = w_s_Vd.shape[0] if valid_vocab is None else valid_vocab
    logp = masked_log_softmax(h_s_Nd.float() @ w_s_Vd.float().T, temperature, valid_vocab)
    logp_y = logp.gather(1, token_ids_N[:, None]).squeeze(1)
    advantage = (teacher_logprobs_N.float() - logp_y).detach()
    ratio = torch.exp(logp_y - rollout_logprobs_N.float())
    surrogate = torch.minimum(ratio * advantage, ratio.clamp(1 - clip_ratio, 1 + clip_ratio) * advantage)
    return -(surrogate * weights_N.float()).sum() / num_tokens
