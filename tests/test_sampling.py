"""The hf engine samples from the model's distribution (both transformers' `generate` and the engine's own
decode loop): temperature, top-k and top-p each checked by a chi-square test of token frequencies
(tests/sampling_check.py says why the sample size and bound). The CUDA samplers' twin is tests/gpu/."""

import pytest
import torch
from transformers import AutoTokenizer

from opd.actors.engines.hf import HFEngine
from sampling_check import CASES, P_MIN, PREFIX, check_first_token_distribution, chi_square_p


@pytest.fixture(scope="module")
def engine_and_ids(root):
    tok = AutoTokenizer.from_pretrained(root / "assets/toy/student")
    engine = HFEngine.from_pretrained(str(root / "assets/toy/student"), eos_id=tok.eos_token_id,
                                      pad_id=tok.pad_token_id)
    return engine, tok(PREFIX).input_ids


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("sampler", [None, "torch"], ids=["generate", "decode_loop"])
def test_token_frequencies_follow_the_model(engine_and_ids, sampler, case):
    engine, ids = engine_and_ids
    engine.sampler = sampler  # None: transformers' generate; "torch": the engine's decode loop
    check_first_token_distribution(engine, engine.model, ids, case)


def test_the_chi_square_check_against_known_values():
    """The statistic and p-value against values worked by hand / from tables."""
    # 3 bins, expected 50 each, observed 60/40/50: X^2 = (100 + 100) / 50 = 4, dof 2 -> p = exp(-2)
    p, statistic = chi_square_p(torch.tensor([60, 40, 50]), torch.tensor([1 / 3] * 3, dtype=torch.float64))
    assert statistic == pytest.approx(4.0) and p == pytest.approx(0.1353352832, rel=1e-9)
    # 1 dof: X^2 = 3.841459 is the 5 % critical value
    p, _ = chi_square_p(torch.tensor([5000 + 98, 5000 - 98]), torch.tensor([0.5, 0.5]))
    assert p == pytest.approx(0.05, rel=0.01)
    # a token the truncation removed was drawn: rejected outright
    assert chi_square_p(torch.tensor([10, 1]), torch.tensor([1.0, 0.0]))[0] == 0.0
    # an argmax sampler's counts against a spread distribution
    assert chi_square_p(torch.tensor([1000, 0, 0]), torch.tensor([0.5, 0.3, 0.2]))[0] < P_MIN
