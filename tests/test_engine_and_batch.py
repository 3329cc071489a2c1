"""The hf engine's sampling contract and the batch layout every actor relies on."""

import torch
from transformers import AutoTokenizer

from actors.engines.hf import HFEngine
from opd.batch import RolloutBatch


def _engine(root):
    tok = AutoTokenizer.from_pretrained(root / "assets/toy/student")
    engine = HFEngine.from_pretrained(str(root / "assets/toy/student"), eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    return engine, tok


def test_generate_returns_the_sampled_distribution_logprobs(root):
    engine, tok = _engine(root)
    prompts = [tok(p).input_ids for p in ["07+45=", "99+99=", "1+2="]]  # one shorter prompt: left padding
    batch = engine.generate(prompts, num_samples=3, temperature=0.8, max_new_tokens=6, seed=5)
    assert batch.num_samples == 9 and batch.prompt_index.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    # Independent check: one plain forward pass over prompt + response, log_softmax(logits / T) at the token.
    for prompt, response, lp in zip(batch.prompts(), batch.responses(),
                                    torch.split(batch.logprobs, batch.response_lens.tolist()), strict=True):
        ids = torch.tensor([prompt + response])
        logits = engine.model(input_ids=ids).logits[0, len(prompt) - 1: -1].float() / 0.8
        want = torch.log_softmax(logits, -1).gather(1, torch.tensor(response)[:, None]).squeeze(1)
        assert torch.allclose(lp, want, atol=1e-4), (lp, want)
    for response, reason in zip(batch.responses(), batch.finish_reasons, strict=True):
        eos_at = [i for i, t in enumerate(response) if t == tok.eos_token_id]
        assert eos_at == ([len(response) - 1] if reason == "stop" else []), "eos ends a response, once"
        assert reason == "stop" or len(response) == 6


def test_generate_is_reproducible_by_seed(root):
    engine, tok = _engine(root)
    prompts = [tok(p).input_ids for p in ["07+45=", "12+34="]]
    a = engine.generate(prompts, num_samples=4, max_new_tokens=5, seed=1)
    b = engine.generate(prompts, num_samples=4, max_new_tokens=5, seed=1)
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.logprobs, b.logprobs)


def test_padded_positions_predict_the_response_tokens():
    batch = RolloutBatch(prompt_ids=torch.tensor([5, 6, 7, 8, 9]), prompt_lens=torch.tensor([3, 2]),
                         response_ids=torch.tensor([1, 2, 3]), response_lens=torch.tensor([1, 2]),
                         logprobs=torch.zeros(3), prompt_index=torch.tensor([0, 1]), finish_reasons=["stop", "length"],
                         policy_version=0).check()
    input_ids, mask, positions = batch.padded(pad_id=0)
    assert input_ids.tolist() == [[5, 6, 7, 1], [8, 9, 2, 3]]
    assert mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 1]]
    # the token after each selected position is the response token it predicts
    assert input_ids.flatten()[positions + 1].tolist() == batch.response_ids.tolist()
    _, _, teacher_positions = batch.padded(pad_id=0, prompts=[[4, 4, 4, 4], [4]])  # teacher's own prompt prefix
    assert teacher_positions.tolist() == [3, 5, 6]
