"""The hf engine's sampling contract and the batch layout every actor relies on."""

import dataclasses
import functools

import pytest
import torch
from transformers import AutoConfig, AutoTokenizer

from opd.actors.engines.hf import HFEngine
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


def _check_sampled_logprobs(engine, batch, temperature, top_k=0, top_p=1.0):
    """Each log-prob is that of the token under softmax(logits / T) after top-k / top-p, renormalised,
    recomputed from one plain forward pass (independent of the decode path)."""
    from opd.actors.engines.hf import filter_probs

    for prompt, response, lp in zip(batch.prompts(), batch.responses(),
                                    torch.split(batch.logprobs, batch.response_lens.tolist()), strict=True):
        logits = engine.model(input_ids=torch.tensor([prompt + response])).logits[0, len(prompt) - 1: -1].float()
        probs = filter_probs(torch.softmax(logits / temperature, -1), top_k=top_k, top_p=top_p)
        want = probs.gather(1, torch.tensor(response)[:, None]).squeeze(1).log()
        assert torch.allclose(lp, want, atol=1e-4), (lp, want)


def test_decode_loop_matches_generate(root):
    """The GPU decode loop (run here with the torch sampler): greedy tokens and log-probs equal transformers'
    generate; sampled log-probs are those of the distribution sampled from, truncation included."""
    engine, tok = _engine(root)
    prompts = [tok(p).input_ids for p in ["07+45=", "99+99=", "1+2="]]
    reference = engine.generate(prompts, max_new_tokens=6, greedy=True)
    engine.sampler = "torch"
    greedy = engine.generate(prompts, max_new_tokens=6, greedy=True)
    assert greedy.responses() == reference.responses() and greedy.finish_reasons == reference.finish_reasons
    assert torch.allclose(greedy.logprobs, reference.logprobs, atol=1e-5) and engine._own_head
    sampled = engine.generate(prompts, num_samples=4, temperature=0.7, max_new_tokens=6, seed=3)
    _check_sampled_logprobs(engine, sampled, 0.7)
    truncated = engine.generate(prompts, num_samples=4, temperature=1.3, top_k=5, top_p=0.8, max_new_tokens=6,
                                seed=4)
    _check_sampled_logprobs(engine, truncated, 1.3, top_k=5, top_p=0.8)
    for prompt, response in zip(truncated.prompts(), truncated.responses(), strict=True):  # only top-5 tokens
        logits = engine.model(input_ids=torch.tensor([prompt + response])).logits[0, len(prompt) - 1: -1]
        assert all(t in row.topk(5).indices.tolist() for t, row in zip(response, logits, strict=True))


def greedy_equals_generate(model, prompts: list[list[int]], *, eos_id: int, pad_id: int, max_new_tokens: int,
                           atol: float = 1e-4, compile: bool = False):
    """The decode loop's greedy tokens and finish reasons equal transformers' generate on `model`, and its
    log-probs within `atol` (the output projection is summed in another order: fp32 rounding)."""
    engine = HFEngine(model, eos_id=eos_id, pad_id=pad_id, sampler=None, compile=compile)
    reference = engine.generate(prompts, max_new_tokens=max_new_tokens, greedy=True)
    engine.sampler = "torch"
    greedy = engine.generate(prompts, max_new_tokens=max_new_tokens, greedy=True)
    assert greedy.responses() == reference.responses() and greedy.finish_reasons == reference.finish_reasons
    assert torch.allclose(greedy.logprobs, reference.logprobs, atol=atol), (greedy.logprobs - reference.logprobs).abs().max()
    assert engine._own_head  # the engine's `w @ h.T` head was checked equal to the model's own
    return greedy


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_decode_loop_matches_generate_on_a_random_qwen3(tmp_path, compile):
    """Qwen3-1.7B's widths (2048 hidden, 16 heads of 128, qk-norm) cut to one layer and 8192 output rows, random
    weights; prompts of different lengths (left padding) for 12 tokens. Compiled (rollout.compile): the
    projections' oneDNN operator inside inductor's graph."""
    if compile:
        _skip_without_a_compiler()
    from transformers import AutoModelForCausalLM

    from opd.shapes import shape_config, write_model_folder

    folder = write_model_folder(tmp_path / "qwen3", shape_config("qwen3-1.7b"), 8192, num_layers=1, vocab_size=8192)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=torch.float32)
    prompts = torch.randint(3, 8192, (3, 9), generator=torch.Generator().manual_seed(1)).tolist()
    greedy = greedy_equals_generate(model, [prompts[0], prompts[1][:4], prompts[2][:7]], eos_id=1, pad_id=0,
                                    max_new_tokens=12, compile=compile)
    assert len(set(greedy.response_ids.tolist())) > 3  # the responses are not one repeated token


def test_filter_probs_against_transformers_warpers():
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    from opd.actors.engines.hf import filter_probs

    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 3
    warped = TopPLogitsWarper(0.8)(None, TopKLogitsWarper(10)(None, logits.clone()))
    want = torch.softmax(warped, -1)
    assert torch.allclose(filter_probs(torch.softmax(logits, -1), top_k=10, top_p=0.8), want, atol=1e-6)


def _batch(prompts, responses, version=3):
    return RolloutBatch(
        prompt_ids=torch.tensor([t for p in prompts for t in p]), prompt_lens=torch.tensor([len(p) for p in prompts]),
        response_ids=torch.tensor([t for r in responses for t in r]),
        response_lens=torch.tensor([len(r) for r in responses]),
        logprobs=-torch.arange(sum(map(len, responses)), dtype=torch.float32), prompt_index=torch.arange(len(prompts)),
        finish_reasons=["stop"] * len(prompts), policy_version=version).check()


def test_concat_of_shards_is_the_whole_batch():
    prompts, responses = [[1, 2], [3], [4, 5, 6], [7], [8, 9]], [[10], [11, 12], [13, 14, 15], [16], [17, 18]]
    batch = _batch(prompts, responses)
    for bounds in ([0, 5], [0, 2, 5], [0, 1, 3, 5], list(range(6))):
        shards = [_batch(prompts[lo:hi], responses[lo:hi]) for lo, hi in zip(bounds, bounds[1:])]
        for shard, lo in zip(shards, bounds):
            shard.prompt_index = shard.prompt_index + lo
            shard.logprobs = shard.logprobs - sum(map(len, responses[:lo]))
        whole = RolloutBatch.concat(shards)
        for f in ("prompt_ids", "prompt_lens", "response_ids", "response_lens", "logprobs", "prompt_index"):
            assert torch.equal(getattr(whole, f), getattr(batch, f)), (bounds, f)


def test_concat_refuses_shards_of_different_versions():
    import pytest

    with pytest.raises(AssertionError, match="different weight versions"):
        RolloutBatch.concat([_batch([[1]], [[2]], version=1), _batch([[1]], [[2]], version=2)])


def test_decode_projections_equal_linear_and_are_removed_after():
    """The CPU decode loop's projections equal nn.Linear computed in float64, bias included, on every path each
    shape may take (the fixed rule's and every candidate the tuning may pick: MKL's `x @ w.T`, `w @ x.T` by
    columns, oneDNN's linear), on both sides of every threshold; modules take the path the engine's table holds
    for their shape, and the class's forward is back afterwards."""
    from opd.actors.engines.cpu_matmul import (FEW_ROWS, ONEDNN_MAX_ROWS, ONEDNN_MIN_INPUTS, candidate_paths, cpu_project,
                                           few_row_projections, few_rows_linear)

    torch.manual_seed(0)
    for inputs in (24, ONEDNN_MIN_INPUTS + 8):
        layers = [torch.nn.Linear(inputs, 40, bias=bias) for bias in (True, False)]
        for m in layers:
            torch.nn.init.normal_(m.weight)
            if m.bias is not None:
                torch.nn.init.normal_(m.bias)
        for rows in (1, FEW_ROWS, FEW_ROWS + 1, ONEDNN_MAX_ROWS, ONEDNN_MAX_ROWS + 1):
            x = torch.randn(rows, 1, inputs)
            wants = [torch.nn.functional.linear(x.double(), m.weight.double(),
                                                None if m.bias is None else m.bias.double()) for m in layers]
            for path in [None, *candidate_paths(rows, torch.float32, head=True)]:
                paths = {} if path is None else {(rows, 40, inputs, m.bias is not None): path for m in layers}
                forwards = {m: functools.partial(few_rows_linear, m, paths) for m in layers}
                with few_row_projections(forwards):
                    got = [m(x) for m in layers]
                for g, m, want in zip(got, layers, wants, strict=True):
                    assert g.shape == (rows, 1, 40)
                    assert torch.allclose(g.double(), want, rtol=0, atol=1e-5 * inputs ** 0.5), (path, rows, inputs)
                    if path is not None:  # the path taken is the one asked for: bit-equal to it called directly
                        assert torch.equal(g[:, 0], cpu_project(x[:, 0], m.weight, m.bias, path=path))
        assert all("forward" not in vars(m) for m in layers)


def test_tuning_keeps_the_fixed_rule_unless_another_path_is_clearly_faster():
    """`pick_path`: the fastest path only when it beats the fixed rule's by more than the margin. `time_paths`
    times every path the same number of times (a warm-up, then interleaved repeats)."""
    from opd.actors.engines.cpu_matmul import TUNE_MARGIN, pick_path, time_paths

    assert pick_path({"linear": 1.0, "columns": 2.0}, "columns") == "linear"
    assert pick_path({"linear": 1.0, "columns": 1.0 + TUNE_MARGIN / 2}, "columns") == "columns"  # noise: the rule
    assert pick_path({"linear": 3.0, "columns": 2.0, "onednn": 1.0}, "linear") == "onednn"
    calls = []
    times = time_paths(calls.append, ["a", "b"], repeats=3, evict=torch.ones(8))
    assert sorted(times) == ["a", "b"] and all(t >= 0 for t in times.values())
    assert calls == ["a", "b"] + ["a", "b"] * 3


def test_engine_tunes_the_shapes_worth_it_and_uses_what_it_picked(monkeypatch):
    """The engine times the paths of every projection shape of at least TUNE_MIN_BYTES and of the head, once per
    row count, and the decode loop then runs each shape on the path picked (here: the timings are fabricated, so
    the pick is known); smaller weights keep the fixed rule untimed."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    import opd.actors.engines.hf as hf
    from opd.actors.engines import cpu_matmul

    config = Qwen3Config(vocab_size=2048, hidden_size=128, intermediate_size=512, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=64)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    timed = []

    def fabricated(run, paths, **kwargs):
        timed.append(paths)
        return {p: (0.1 if p == "onednn" else 1.0) for p in paths}  # oneDNN always clearly faster

    monkeypatch.setattr(cpu_matmul, "time_paths", fabricated)
    engine = HFEngine(model, eos_id=1, pad_id=0, sampler="torch")
    used = []
    original = cpu_matmul.cpu_project

    def recording(x, w, bias=None, *, path=None):
        if x.shape[0] == 2:  # the decode steps' rows (the prefill's projections have 6: the rule)
            used.append((tuple(w.shape), path))
        return original(x, w, bias, path=path)

    monkeypatch.setattr(hf, "cpu_project", recording)  # the head's calls
    monkeypatch.setattr(cpu_matmul, "cpu_project", recording)  # the layers'
    engine.generate([[5, 6, 7], [8, 9, 10]], max_new_tokens=3, greedy=True)
    used.clear()  # the first call also ran the model's own head once (its check against the engine's)
    engine.generate([[5, 6, 7], [8, 9, 10]], max_new_tokens=3, greedy=True)  # tuned already: not timed again
    # 128 x 512 (gate, up) and 512 x 128 (down): 256 KiB each, timed; 128 x 128 (q, o; 64 KiB), 64 x 128 (k, v)
    # keep the rule; the head (2048 x 128, 1 MiB) timed
    assert len(timed) == 3
    big = {(512, 128), (128, 512), (2048, 128)}
    assert {p for shape, p in used if shape in big} == {"onednn"}
    assert all(p is None for shape, p in used if shape not in big) and any(shape == (128, 128) for shape, _ in used)


def test_preallocated_cache_layer_equals_transformers_dynamic_layer():
    """The decode loop's KV cache layer returns what transformers' DynamicLayer returns after every update
    (prefill, then single positions and a block), and refuses to write past its buffers."""
    from transformers.cache_utils import DynamicLayer

    from opd.actors.engines.hf import PreallocatedLayer

    ours, theirs = PreallocatedLayer(9), DynamicLayer()
    g = torch.Generator().manual_seed(0)
    for length in (4, 1, 1, 3):
        k, v = torch.randn(2, 3, length, 5, generator=g), torch.randn(2, 3, length, 5, generator=g)
        for a, b in zip(ours.update(k, v), theirs.update(k, v), strict=True):
            assert torch.equal(a, b)
        assert ours.get_seq_length() == theirs.get_seq_length()
        assert ours.get_mask_sizes(1) == theirs.get_mask_sizes(1)
    with pytest.raises(ValueError, match="holds 9 positions"):
        ours.update(k[:, :, :1], v[:, :, :1])


def _skip_without_a_compiler():
    from opd.config import ConfigError
    from opd.preflight import check_compiler
    from opd.presets import tiny_cpu

    try:
        check_compiler(dataclasses.replace(tiny_cpu(), rollout=dataclasses.replace(tiny_cpu().rollout, compile=True)))
    except ConfigError as e:
        pytest.skip(str(e))


def test_compiled_decode_steps_match_the_eager_loop(root):
    """rollout.compile: the decode steps through torch.compile give the eager loop's tokens and log-probs (the
    compiled head sums in another order: fp32 rounding) and generate's greedy tokens, over calls that change what
    the compiled graphs were built for (rows, padding, a context as long as another size of the graph: the
    heads' width): the guards skipped inside a loop are checked at its first decode step."""
    _skip_without_a_compiler()
    eager, tok = _engine(root)
    eager.sampler = "torch"
    compiled = HFEngine(eager.model, eos_id=eager.eos_id, pad_id=eager.pad_id, sampler="torch", compile=True)
    generate = HFEngine(eager.model, eos_id=eager.eos_id, pad_id=eager.pad_id, sampler=None)
    same_length = [tok(p).input_ids for p in ["07+45=", "99+99="]]
    padded = same_length + [tok("1+2=").input_ids]
    head_dim = compiled.model.config.head_dim  # a context of head_dim tokens at the first decode step
    as_wide_as_a_head = [(ids * head_dim)[:head_dim] for ids in same_length]
    for prompts, samples in ((as_wide_as_a_head, 1), (same_length, 1), (padded, 1), (same_length, 3),
                             (same_length, 1)):
        a = compiled.generate(prompts, num_samples=samples, temperature=0.9, max_new_tokens=12, seed=7)
        b = eager.generate(prompts, num_samples=samples, temperature=0.9, max_new_tokens=12, seed=7)
        assert a.responses() == b.responses()
        assert torch.allclose(a.logprobs, b.logprobs, atol=1e-5), (a.logprobs - b.logprobs).abs().max()
        _check_sampled_logprobs(eager, a, 0.9)
    for prompts in (same_length, padded):
        greedy = compiled.generate(prompts, max_new_tokens=6, greedy=True)
        reference = generate.generate(prompts, max_new_tokens=6, greedy=True)
        assert greedy.responses() == reference.responses()
        assert torch.allclose(greedy.logprobs, reference.logprobs, atol=1e-5)
    assert compiled._own_head


def test_grouped_query_attention_for_one_position_equals_repeated_heads():
    """rollout.compile's attention (`gqa_sdpa_attention`): one query position over grouped KV heads, with a
    padding mask, equals attention written out in float64 over keys and values repeated for every query head;
    several positions take transformers' own sdpa attention unchanged."""
    import types

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from opd.actors.engines.hf import gqa_sdpa_attention

    g = torch.Generator().manual_seed(0)
    module = types.SimpleNamespace(num_key_value_groups=3, training=False, is_causal=True)
    q, k, v = (torch.randn(2, heads, n, 16, generator=g) for heads, n in ((6, 1), (2, 9), (2, 9)))
    mask = torch.ones(2, 1, 1, 9, dtype=torch.bool)
    mask[1, ..., :4] = False  # the second row's first four positions are padding
    out, _ = gqa_sdpa_attention(module, q, k, v, mask, scaling=0.25)
    kr, vr = (t.double().repeat_interleave(3, dim=1) for t in (k, v))
    scores = (q.double() @ kr.transpose(-1, -2) * 0.25).masked_fill(~mask, float("-inf"))
    want = (scores.softmax(-1) @ vr).transpose(1, 2)
    assert out.shape == (2, 1, 6, 16) and torch.allclose(out.double(), want, atol=1e-6)
    q3 = torch.randn(2, 6, 3, 16, generator=g)
    mask3 = torch.ones(2, 1, 3, 9, dtype=torch.bool).tril(6)
    assert torch.equal(gqa_sdpa_attention(module, q3, k, v, mask3, scaling=0.25)[0],
                       sdpa_attention_forward(module, q3, k, v, mask3, scaling=0.25)[0])


def test_a_kv_budget_decodes_in_waves_with_the_same_answers(root):
    """rollout.max_batch_tokens: rows x (longest prompt + max_new_tokens) of KV cache at a time. Greedy answers
    equal the whole batch's; sampled ones are reproducible by seed and their log-probs are still those of the
    distribution sampled from; each wave holds at most the budget."""
    engine, tok = _engine(root)
    prompts = [tok(p).input_ids for p in ["07+45=", "99+99=", "1+2=", "12+34=", "50+50="]]
    whole = engine.generate(prompts, greedy=True, max_new_tokens=6)
    waves = []
    real = engine._generate_rows
    engine._generate_rows = lambda flat, **kw: waves.append(len(flat)) or real(flat, **kw)
    engine.max_batch_tokens = 2 * (6 + 6)  # two rows of a 6-token prompt and 6 new tokens
    bounded = engine.generate(prompts, greedy=True, max_new_tokens=6)
    assert waves == [2, 2, 1]
    assert bounded.responses() == whole.responses() and bounded.finish_reasons == whole.finish_reasons
    assert torch.allclose(bounded.logprobs, whole.logprobs, atol=1e-5)
    a, b = (engine.generate(prompts, num_samples=2, temperature=0.8, max_new_tokens=6, seed=3) for _ in range(2))
    assert a.responses() == b.responses() and torch.equal(a.logprobs, b.logprobs)
    for prompt, response, lp in zip(a.prompts(), a.responses(), torch.split(a.logprobs, a.response_lens.tolist()),
                                    strict=True):
        logits = engine.model(input_ids=torch.tensor([prompt + response])).logits[0, len(prompt) - 1:-1] / 0.8
        want = torch.log_softmax(logits, -1).gather(1, torch.tensor(response)[:, None]).squeeze(1)
        assert torch.allclose(lp, want, atol=1e-4), (lp, want)
