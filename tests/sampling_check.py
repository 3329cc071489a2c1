"""What the engines sample, against the model's own distribution: first-token frequencies at a fixed prefix
compared with softmax(logits / T) after top-k / top-p (transformers' warpers, in float64) by a chi-square test.

Why these numbers: the prefix `07+45=0` leaves the toy student unsure of the next digit (entropy 1.71 nats over
16 tokens), so temperature and truncation change the distribution a lot. 20,000 samples put >= 20 expected counts
in most bins; bins under 5 are pooled. With a fixed seed the test is deterministic; p >= 1e-4 is the bar a correct
sampler clears (it would fail on one seed in 10,000), and each case also shows the test has the power to tell the
setting apart: the same counts reject a nearby wrong distribution (temperature off by 20 %, or truncation ignored)
with p < 1e-4. A sampler that takes the argmax, ignores the temperature or skips the truncation fails.
"""

from __future__ import annotations

import torch
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

PREFIX = "07+45=0"
NUM_SAMPLES = 20_000
P_MIN = 1e-4
# (temperature, top_k, top_p) and the nearby wrong setting the counts must reject
CASES = {
    "t1": ((1.0, 0, 1.0), (0.8, 0, 1.0)),
    "t0.6": ((0.6, 0, 1.0), (0.75, 0, 1.0)),
    "t1.7": ((1.7, 0, 1.0), (1.4, 0, 1.0)),
    "top_k4": ((1.3, 4, 1.0), (1.3, 0, 1.0)),
    "top_p0.7": ((1.0, 0, 0.7), (1.0, 0, 1.0)),
}


def model_probs(model, prefix_ids: list[int], temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """The distribution the engine should sample the next token from, in float64 on the CPU."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prefix_ids], device=model.device)).logits[0, -1]
    scores = logits.double().cpu()[None] / temperature
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return torch.softmax(scores, -1)[0]


def chi_square_p(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, float]:
    """(p-value, statistic) of Pearson's chi-square test of `counts` against `probs` over the tokens that can be
    drawn (probability > 0); bins expecting fewer than 5 are pooled. A token with probability 0 that was drawn
    gives p = 0."""
    n = float(counts.sum())
    if bool(counts[probs == 0].any()):
        return 0.0, float("inf")
    expected, observed = probs.double() * n, counts.double()
    keep = probs > 0
    big, small = keep & (expected >= 5), keep & (expected < 5)
    exp, obs = expected[big].tolist(), observed[big].tolist()
    if small.any():
        if float(expected[small].sum()) >= 5 or not exp:
            exp, obs = exp + [float(expected[small].sum())], obs + [float(observed[small].sum())]
        else:  # too little mass to stand alone: pool it with the least likely large bin
            i = min(range(len(exp)), key=exp.__getitem__)
            exp[i] += float(expected[small].sum())
            obs[i] += float(observed[small].sum())
    exp_t, obs_t = torch.tensor(exp, dtype=torch.float64), torch.tensor(obs, dtype=torch.float64)
    statistic = float(((obs_t - exp_t) ** 2 / exp_t).sum())
    dof = len(exp) - 1
    if dof == 0:
        return 1.0, statistic
    p = float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                      torch.tensor(statistic / 2, dtype=torch.float64)))
    return p, statistic


def check_first_token_distribution(engine, model, prefix_ids: list[int], case: str, *, seed: int = 0) -> None:
    """Sample NUM_SAMPLES one-token responses at `prefix_ids` with the case's settings and test their frequencies;
    also check each returned log-prob is that of the token under the sampled distribution."""
    (temperature, top_k, top_p), wrong = CASES[case]
    batch = engine.generate([prefix_ids], num_samples=NUM_SAMPLES, temperature=temperature, top_k=top_k,
                            top_p=top_p, max_new_tokens=1, seed=seed)
    assert batch.response_lens.tolist() == [1] * NUM_SAMPLES
    tokens = batch.response_ids.cpu()
    probs = model_probs(model, prefix_ids, temperature, top_k, top_p)
    counts = torch.bincount(tokens, minlength=probs.numel())
    p, statistic = chi_square_p(counts, probs)
    freq = counts.double() / NUM_SAMPLES
    tv = 0.5 * float((freq - probs).abs().sum())
    assert p >= P_MIN, (f"{case}: token frequencies do not follow the model's distribution: chi-square "
                        f"{statistic:.1f}, p = {p:.2e}, total variation {tv:.4f}; counts {counts.tolist()}, "
                        f"expected {[round(x, 1) for x in (probs * NUM_SAMPLES).tolist()]}")
    p_wrong, _ = chi_square_p(counts, model_probs(model, prefix_ids, *wrong))
    assert p_wrong < P_MIN, f"{case}: the test cannot tell {CASES[case][0]} from {wrong} (p = {p_wrong:.2e})"
    want = probs.log()[tokens].float()
    assert torch.allclose(batch.logprobs.cpu(), want, atol=1e-4), "log-probs are not the sampled distribution's"
