"""The chunked fused divergence against the materialised reference: loss and both gradients."""

import pytest
import torch

from opd.kernels.chunked import chunked_divergence, chunked_sampled_rkl, chunked_token_logprobs, default_chunk_size
from opd.kernels.reference import distill_loss, divergence, masked_log_softmax, sampled_rkl_loss

CASES = [("fkl", 0.5), ("rkl", 0.5), ("jsd", 0.5), ("jsd", 0.1), ("jsd", 0.0), ("jsd", 1.0)]


def _inputs(n=37, d_s=24, d_t=40, v=1031, v_s=None, v_t=None, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    v_s, v_t = v_s or v, v_t or v
    h_s = (torch.randn(n, d_s, generator=g) * 0.7).to(dtype).requires_grad_()
    w_s = (torch.randn(v_s, d_s, generator=g) * 0.7).to(dtype).requires_grad_()
    h_t = torch.randn(n, d_t, generator=g).to(dtype)
    w_t = torch.randn(v_t, d_t, generator=g).to(dtype)
    weights = (torch.rand(n, generator=g) > 0.25).float()  # some tokens masked out
    return h_s, w_s, h_t, w_t, weights


def _loss_and_grads(fn, h_s, w_s, h_t, w_t, weights, **kw):
    out = fn(h_s, w_s, h_t, w_t, weights, **kw)
    loss = out[0] if isinstance(out, tuple) else out
    grads = torch.autograd.grad(loss, [h_s, w_s])
    return loss.detach(), grads


def _report(name, got, want, tol):
    diff = (got.float() - want.float()).abs()
    bad = diff > tol * (1 + want.float().abs())
    assert not bad.any(), (f"{name}: {int(bad.sum())} of {bad.numel()} elements differ, max {diff.max():.3e} "
                           f"at {tuple(int(i) for i in torch.nonzero(bad)[0])}")


@pytest.mark.parametrize("kind,beta", CASES)
def test_chunked_matches_reference_fp32(kind, beta):
    args = _inputs()
    kw = dict(kind=kind, beta=beta, temperature=1.7, num_tokens=53)
    want_loss, want_grads = _loss_and_grads(distill_loss, *args, **kw)
    got_loss, got_grads = _loss_and_grads(chunked_divergence, *args, chunk_size=7, **kw)
    _report("loss", got_loss, want_loss, 1e-5)
    _report("grad h_s", got_grads[0], want_grads[0], 1e-5)
    _report("grad w_s", got_grads[1], want_grads[1], 1e-5)


@pytest.mark.parametrize("kind,beta", CASES[:3])
def test_chunked_bf16_close_to_fp32_reference(kind, beta):
    args32 = _inputs()
    args16 = [a.detach().to(torch.bfloat16) for a in args32[:4]] + [args32[4]]
    args16[0].requires_grad_(), args16[1].requires_grad_()
    kw = dict(kind=kind, beta=beta, temperature=1.3, num_tokens=37)
    want_loss, want_grads = _loss_and_grads(distill_loss, *[a.detach().float().requires_grad_()
                                                           if i < 2 else a.float() for i, a in enumerate(args16)], **kw)
    got_loss, got_grads = _loss_and_grads(chunked_divergence, *args16, chunk_size=5, **kw)
    assert got_grads[0].dtype == torch.bfloat16
    _report("loss", got_loss, want_loss, 2e-2)
    scale = max(float(want_grads[0].abs().max()), 1e-12)
    assert float((got_grads[0].float() - want_grads[0]).abs().max()) <= 2e-2 * scale
    scale = max(float(want_grads[1].abs().max()), 1e-12)
    assert float((got_grads[1].float() - want_grads[1]).abs().max()) <= 2e-2 * scale


@pytest.mark.parametrize("kind,beta", CASES[:3])
def test_bf16_operands_with_fp32_accumulation_match_the_bf16_rounded_reference(kind, beta):
    """operand_dtype=bf16 (fp32 inputs, fp32 gradients): each GEMM sees bf16-rounded operands and accumulates in
    fp32. The reference: fp32 materialised logits from the same bf16-rounded hidden states and weights, so only
    the rounding of the row gradient before its two GEMMs differs (2e-2); against the unrounded fp32 loss,
    within 1e-2 relative."""
    args = _inputs()
    kw = dict(kind=kind, beta=beta, temperature=1.3, num_tokens=37)
    rounded = [a.detach().to(torch.bfloat16).float().requires_grad_() if i < 2 else a.to(torch.bfloat16).float()
               if i < 4 else a for i, a in enumerate(args)]
    want_loss, want_grads = _loss_and_grads(distill_loss, *rounded, **kw)
    fp32_loss, _ = _loss_and_grads(distill_loss, *args, **kw)
    got_loss, got_grads = _loss_and_grads(chunked_divergence, *args, chunk_size=5, operand_dtype=torch.bfloat16, **kw)
    assert got_grads[0].dtype == got_grads[1].dtype == torch.float32
    _report("loss", got_loss, want_loss, 1e-5)  # the forward is exact given the rounded operands
    for name, got, want in zip(("grad h_s", "grad w_s"), got_grads, want_grads, strict=True):
        scale = max(float(want.abs().max()), 1e-12)
        assert float((got - want).abs().max()) <= 2e-2 * scale, name
    assert abs(float(got_loss) - float(fp32_loss)) <= 1e-2 * abs(float(fp32_loss))
    assert float(got_loss) != float(fp32_loss)  # the operands really were rounded


@pytest.mark.parametrize("kind", ["fkl", "rkl", "jsd"])
def test_chunk_size_does_not_change_results(kind):
    args = _inputs(n=37)
    results = [_loss_and_grads(chunked_divergence, *args, kind=kind, num_tokens=37, chunk_size=c) for c in (1, 7, 37)]
    for loss, grads in results[1:]:
        _report("loss", loss, results[0][0], 1e-6)
        _report("grad h_s", grads[0], results[0][1][0], 1e-6)
        _report("grad w_s", grads[1], results[0][1][1], 1e-6)


def test_micro_batches_add_up_to_the_full_batch():
    """Normalisation contract: per-micro-batch losses with the global token count sum to the batch loss."""
    h_s, w_s, h_t, w_t, weights = _inputs(n=40)
    num_tokens = float(weights.sum())
    full, full_grads = _loss_and_grads(chunked_divergence, h_s, w_s, h_t, w_t, weights, kind="rkl",
                                       num_tokens=num_tokens)
    total = 0
    for part in torch.arange(40).chunk(4):
        total = total + chunked_divergence(h_s[part], w_s, h_t[part], w_t, weights[part], kind="rkl",
                                           num_tokens=num_tokens, chunk_size=3)[0]
    grads = torch.autograd.grad(total, [h_s, w_s])
    _report("loss", total.detach(), full, 1e-6)
    _report("grad h_s", grads[0], full_grads[0], 1e-6)
    _report("grad w_s", grads[1], full_grads[1], 1e-6)


def test_padded_vocab_rows_get_no_probability_and_no_gradient():
    """V_s != V_t (the Qwen2.5 1.5B/7B case): rows past the tokenizer's size are -inf, never zero."""
    valid = 1000
    h_s, w_s, h_t, w_t, weights = _inputs(v_s=1024, v_t=1031)
    loss, grads = _loss_and_grads(chunked_divergence, h_s, w_s, h_t, w_t, weights, kind="fkl", num_tokens=37,
                                  valid_vocab=valid, chunk_size=8)
    assert torch.count_nonzero(grads[1][valid:]) == 0
    # The same loss as if the padded rows did not exist at all ...
    cut, _ = _loss_and_grads(distill_loss, h_s, w_s[:valid], h_t, w_t[:valid], weights, kind="fkl", num_tokens=37)
    _report("loss", loss, cut, 1e-6)
    # ... and not the loss of zero-padded logits, which would give the padded slots mass.
    zero_padded = torch.cat([h_s @ w_s[:valid].T, torch.zeros(37, 31)], dim=1)
    teacher = torch.cat([h_t @ w_t[:valid].T, torch.zeros(37, 31)], dim=1)
    wrong = (divergence(zero_padded, teacher, kind="fkl") * weights).sum() / 37
    assert abs(float(wrong.detach()) - float(loss)) > 1e-4


def test_tied_embedding_receives_the_output_gradient():
    """An embedding that is also the output weight: both uses accumulate into one gradient."""
    ids = torch.randint(0, 50, (9,), generator=torch.Generator().manual_seed(1))
    h_t, w_t = torch.randn(9, 8), torch.randn(50, 8)
    grads = []
    for fn in (chunked_divergence, distill_loss):
        emb = torch.nn.Embedding(50, 16)
        torch.nn.init.normal_(emb.weight, generator=torch.Generator().manual_seed(2))
        out = fn(emb(ids), emb.weight, h_t, w_t, torch.ones(9), kind="rkl", num_tokens=9)
        (out[0] if isinstance(out, tuple) else out).backward()
        grads.append(emb.weight.grad)
    _report("tied grad", grads[0], grads[1], 1e-5)
    unused = torch.ones(50, dtype=torch.bool)
    unused[ids] = False  # rows only used as output weight still get a gradient
    assert grads[0][unused].abs().sum() > 0


def test_teacher_equal_to_student_gives_zero_divergence():
    h, w, _, _, weights = _inputs()
    for kind, beta in CASES:
        loss, stats = chunked_divergence(h, w, h.detach(), w.detach(), weights, kind=kind, beta=beta, num_tokens=37)
        assert abs(float(loss.detach())) < 1e-6 and abs(float(stats[0])) < 1e-5 and abs(float(stats[1])) < 1e-5


def test_stats_are_the_weighted_kl_sums():
    h_s, w_s, h_t, w_t, weights = _inputs()
    _, stats = chunked_divergence(h_s, w_s, h_t, w_t, weights, kind="jsd", num_tokens=1, chunk_size=6)
    s, t = (h_s @ w_s.T).detach(), h_t @ w_t.T
    assert torch.allclose(stats[0], (divergence(s, t, kind="fkl") * weights).sum(), rtol=1e-5)
    assert torch.allclose(stats[1], (divergence(s, t, kind="rkl") * weights).sum(), rtol=1e-5)


def test_token_logprobs_match_log_softmax():
    h, w, _, _, _ = _inputs()
    ids = torch.randint(0, 1000, (37,))
    got = chunked_token_logprobs(h.detach(), w.detach(), ids, temperature=0.7, valid_vocab=1000, chunk_size=5)
    want = masked_log_softmax(h @ w.T, 0.7, 1000).gather(1, ids[:, None]).squeeze(1)
    _report("logprobs", got, want.detach(), 1e-5)


def test_default_chunk_size_depends_on_v_and_d_only():
    for vocab in (16, 32_000, 151_936):
        for hidden in (64, 256, 1536, 4096):
            c = default_chunk_size(vocab, hidden)
            assert c & (c - 1) == 0 and 32 <= c  # a power of two, never a handful of rows
            assert c * vocab <= max(1 << 22, 256 * vocab)  # bounded block: O(chunk x V), not O(N x V)
    assert default_chunk_size(16, 256) == 1 << 18  # tiny vocabularies: one chunk covers any batch here
    assert default_chunk_size(151_936, 256) == 128 and default_chunk_size(151_936, 4096) == 32


def _sampled_inputs(n=37, d=24, v=1031, valid=1000, temperature=1.3, seed=3):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(n, d, generator=g) * 0.7).requires_grad_()
    w = (torch.randn(v, d, generator=g) * 0.7).requires_grad_()
    ids = torch.randint(0, valid, (n,), generator=g)
    with torch.no_grad():  # a sampler a little off-policy, so some ratios leave the clip range
        rollout = masked_log_softmax(h @ w.T, temperature, valid).gather(1, ids[:, None]).squeeze(1)
        rollout += torch.randn(n, generator=g) * 0.3
    teacher = rollout - torch.rand(n, generator=g) * 3
    weights = (torch.rand(n, generator=g) > 0.25).float()
    return h, w, ids, teacher, rollout, weights


def test_sampled_rkl_matches_reference():
    h, w, ids, teacher, rollout, weights = _sampled_inputs()
    kw = dict(num_tokens=41, temperature=1.3, clip_ratio=0.2, valid_vocab=1000)
    want = sampled_rkl_loss(h, w, ids, teacher, rollout, weights, **kw)
    want_grads = torch.autograd.grad(want, [h, w])
    for chunk in (1, 7, 37):
        got, stats = chunked_sampled_rkl(h, w, ids, teacher, rollout, weights, chunk_size=chunk, **kw)
        grads = torch.autograd.grad(got, [h, w])
        _report("loss", got.detach(), want.detach(), 1e-5)
        _report("grad h", grads[0], want_grads[0], 1e-5)
        _report("grad w", grads[1], want_grads[1], 1e-5)
        assert 0 < float(stats[2]) < float(weights.sum())  # some, not all, tokens clipped
        assert torch.count_nonzero(grads[1][1000:]) == 0


def test_sampled_rkl_on_policy_gradient_is_the_reverse_kl_score_function():
    """On-policy (ratio 1) the gradient is sum_t w_t (log p_S - log p_T)(y_t) grad log p_S(y_t) / N."""
    h, w, ids, teacher, _, weights = _sampled_inputs()
    with torch.no_grad():
        rollout = masked_log_softmax(h @ w.T, 1.0, 1031).gather(1, ids[:, None]).squeeze(1)
    loss, stats = chunked_sampled_rkl(h, w, ids, teacher, rollout, weights, num_tokens=37)
    got = torch.autograd.grad(loss, [h])[0]
    logp = masked_log_softmax(h @ w.T, 1.0, 1031).gather(1, ids[:, None]).squeeze(1)
    surrogate = ((logp.detach() - teacher) * logp * weights).sum() / 37
    want = torch.autograd.grad(surrogate, [h])[0]
    _report("grad h", got, want, 1e-5)
    assert float(stats[3]) < 1e-5 and float(stats[2]) == 0  # no gap, nothing clipped


def test_sampled_rkl_chunk_sizes_agree_and_bf16_is_close():
    h, w, ids, teacher, rollout, weights = _sampled_inputs()
    kw = dict(num_tokens=37, temperature=1.3, valid_vocab=1000)
    results = []
    for chunk in (1, 7, 37):
        loss, _ = chunked_sampled_rkl(h, w, ids, teacher, rollout, weights, chunk_size=chunk, **kw)
        results.append((loss.detach(), torch.autograd.grad(loss, [h, w])))
    for loss, grads in results[1:]:
        _report("loss", loss, results[0][0], 1e-6)
        _report("grad h", grads[0], results[0][1][0], 1e-6)
        _report("grad w", grads[1], results[0][1][1], 1e-6)
    h16, w16 = h.detach().bfloat16().requires_grad_(), w.detach().bfloat16().requires_grad_()
    loss16, _ = chunked_sampled_rkl(h16, w16, ids, teacher, rollout, weights, chunk_size=7, **kw)
    h32 = h16.detach().float().requires_grad_()  # the reference on the same (bf16-rounded) inputs, in fp32
    want = sampled_rkl_loss(h32, w16.detach().float(), ids, teacher, rollout, weights, **kw)
    assert abs(float(loss16.detach()) - float(want.detach())) <= 2e-2 * abs(float(want.detach()))
    g16, want_g = torch.autograd.grad(loss16, [h16])[0], torch.autograd.grad(want, [h32])[0]
    assert g16.dtype == torch.bfloat16
    assert float((g16.float() - want_g).abs().max()) <= 2e-2 * float(want_g.abs().max())


def under_bf16_autocast(fn):
    """fn() inside CPU bf16 autocast, as the learner runs its loss with learner.compute_dtype=bfloat16."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16  # autocast is on: fp32 @ becomes bf16
        return fn()


def _divergence_case():
    h_s, w_s, h_t, w_t, weights = _inputs()

    def run():
        loss, stats = chunked_divergence(h_s, w_s, h_t, w_t, weights, kind="rkl", num_tokens=37, chunk_size=7)
        return [loss, stats, *torch.autograd.grad(loss, [h_s, w_s])]

    return run


def _sampled_rkl_case():
    h, w, ids, teacher, rollout, weights = _sampled_inputs()

    def run():
        loss, stats = chunked_sampled_rkl(h, w, ids, teacher, rollout, weights, num_tokens=37, temperature=1.3,
                                          valid_vocab=1000, chunk_size=7)
        return [loss, stats, *torch.autograd.grad(loss, [h, w])]

    return run


def _token_logprobs_case():
    h, w, _, _, _ = _inputs()
    ids = torch.randint(0, 1000, (37,), generator=torch.Generator().manual_seed(4))
    return lambda: [chunked_token_logprobs(h.detach(), w.detach(), ids, temperature=0.7, valid_vocab=1000,
                                           chunk_size=5)]


@pytest.mark.parametrize("case", [_divergence_case, _sampled_rkl_case, _token_logprobs_case],
                         ids=["divergence", "sampled_rkl", "token_logprobs"])
def test_fp32_kernels_stay_fp32_under_bf16_autocast(case):
    """The learner's bf16 autocast must not reach the kernels' fp32 math: the same loss, stats and gradients (or
    log-probs) as without it, on the same fp32 inputs (made outside autocast). A bf16 GEMM here moves them by
    ~1e-3 relative, far beyond 1e-6."""
    run = case()
    want, got = run(), under_bf16_autocast(run)
    for name, g, w in zip(("loss", "stats", "grad h", "grad w")[:len(want)], got, want, strict=True):
        assert g.dtype == torch.float32, name
        _report(name, g.detach(), w.detach(), 1e-6)
