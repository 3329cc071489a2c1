"""The hf engine's decode loop on a CUDA GPU samples from the model's distribution: torch's and FlashInfer's
samplers, temperature, top-k and top-p, by the chi-square test of tests/sampling_check.py (the CPU twin is
tests/test_sampling.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs 1 CUDA GPU")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from gpu_deps import needs  # noqa: E402
from sampling_check import CASES, PREFIX, check_first_token_distribution  # noqa: E402  (tests/ on the path)


@pytest.fixture(scope="module")
def model_and_ids(root):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(root / "assets/toy/student")
    model = AutoModelForCausalLM.from_pretrained(root / "assets/toy/student", dtype=torch.float32).cuda().eval()
    return model, tok, tok(PREFIX).input_ids


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("sampler", ["torch", "flashinfer"])
def test_gpu_token_frequencies_follow_the_model(model_and_ids, sampler, case):
    if sampler == "flashinfer":
        needs("flashinfer", required=False, why="optional, rollout.sampler=auto falls back to torch")
    from opd.actors.engines.hf import HFEngine

    model, tok, ids = model_and_ids
    engine = HFEngine(model, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, sampler=sampler)
    check_first_token_distribution(engine, model, ids, case)
