"""The sglang adapter against sglang 0.5.23's real `Engine`, on the CPU (tests/sglang_harness.py).

What differs from a GPU: fp32 and the torch_native attention backend, no CUDA graphs, no memory saver (a
release frees nothing), and CPU tensors in place of CUDA IPC handles in a flattened bucket (shared-memory file
names). The generation, the log-probs, the weight-update session, the flattened-bucket layout, flush / release /
resume and shutdown are sglang's own code.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import psutil
import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen3Config, Qwen3ForCausalLM

from opd.actors.engines.hf import HFEngine
from opd.actors.engines.sglang import SGLangEngine, engine_kwargs
from opd.transport.sglang_weights import TensorBucketUpdate
from tests.sglang_harness import EngineProcess, cpu_env, require_engine

pytestmark = pytest.mark.slow
EOS, PAD, VOCAB = 3, 0, 384
PROMPTS = [[5, 17, 42, 9], [100, 7], [250, 251, 252, 253, 254, 255]]


def _config() -> Qwen3Config:
    return Qwen3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                       tie_word_embeddings=False, eos_token_id=EOS, pad_token_id=PAD, bos_token_id=1,
                       architectures=["Qwen3ForCausalLM"])  # as the shape folders' configs (assets/shapes) name it


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A random 2-layer Qwen3 saved with its weights, and its shape folder (config only: no weights)."""
    root = tmp_path_factory.mktemp("sglang_models")
    torch.manual_seed(0)
    Qwen3ForCausalLM(_config()).save_pretrained(root / "model")
    _config().save_pretrained(root / "shape")
    return root / "model", root / "shape"


def _hf(folder, state=None) -> HFEngine:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    if state is not None:
        model.load_state_dict(state)
    return HFEngine(model, eos_id=EOS, pad_id=PAD, sampler="torch")


def _start(folder) -> EngineProcess:
    require_engine()
    return EngineProcess(**engine_kwargs(str(folder), mem_fraction_static=0.5, device="cpu"))


@pytest.fixture(scope="module")
def engine(folders):
    process = _start(folders[0])
    yield SGLangEngine(process, eos_id=EOS, releases_memory=False)  # as from_config(device="cpu") builds it
    process.shutdown()
    process.kill()


def _perturbed(folder, scale: float = 0.5) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return {n: p.detach() + scale * p.detach().std() * torch.randn_like(p) for n, p in model.state_dict().items()}


def _update(version: int, state: dict[str, torch.Tensor]) -> TensorBucketUpdate:
    # two buckets, each one flattened bucket (sglang's FlattenedTensorBucket layout), CPU tensors
    names = list(state)
    half = len(names) // 2
    return TensorBucketUpdate(version, buckets=[[(n, state[n]) for n in names[:half]],
                                                [(n, state[n]) for n in names[half:]]])


def test_the_stand_in_op_equals_sglangs_own_kernel():
    """The one op a CPU run calls, against sglang's triton kernel it stands in for (triton's interpreter, CPU);
    every other name is a placeholder that raises."""
    require_engine()
    code = textwrap.dedent("""
        import os
        os.environ["TRITON_INTERPRET"] = "1"
        import torch, sgl_kernel
        from sglang.srt.mem_cache.allocation import assign_req_to_token_pool
        g = torch.Generator().manual_seed(0)
        for rows, lengths in [(3, [(0, 7), (5, 5), (33, 40)]), (4, [(2, 3), (0, 40), (10, 31), (39, 40)])]:
            idx = torch.randperm(6, generator=g)[:rows]
            start = torch.tensor([s for s, _ in lengths]); end = torch.tensor([e for _, e in lengths])
            loc = torch.randint(1, 1000, (int((end - start).sum()),), generator=g)
            want, got = torch.zeros(6, 40, dtype=torch.int32), torch.zeros(6, 40, dtype=torch.int32)
            assign_req_to_token_pool[(rows,)](idx, want, start, end, loc, 40, 4)
            sgl_kernel.assign_req_to_token_pool_cpu(idx, got, start, end, loc, 40)
            assert torch.equal(want, got) and int(want.count_nonzero()) == len(loc), (want, got)
        try:
            sgl_kernel.copy_all_layer_kv_cache_cpu(None, None, None, None)
        except NotImplementedError as e:
            assert "stand-in" in str(e), e
        else:
            raise AssertionError("a placeholder ran")
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], env=cpu_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_greedy_tokens_and_logprobs_equal_the_hf_engine(engine, folders):
    got = engine.generate(PROMPTS, greedy=True, max_new_tokens=12)
    want = _hf(folders[0]).generate(PROMPTS, greedy=True, max_new_tokens=12)
    assert got.responses() == want.responses()
    assert got.finish_reasons == want.finish_reasons
    assert torch.allclose(got.logprobs, want.logprobs, atol=1e-4), (got.logprobs - want.logprobs).abs().max()


def test_sampled_logprobs_equal_the_learners_recomputation(engine, folders):
    """log_softmax(logits / T) at each sampled token, recomputed by one forward pass over prompt + response (the
    learner's recomputation), within the bound the hf engine's test uses."""
    temperature = 0.8
    batch = engine.generate(PROMPTS, num_samples=4, temperature=temperature, max_new_tokens=10)
    model = _hf(folders[0]).model
    responses = batch.responses()
    assert len(set(map(tuple, responses[:4]))) > 1, "the repeats of a prompt must differ"
    for prompt, response, lp in zip(batch.prompts(), responses,
                                    torch.split(batch.logprobs, batch.response_lens.tolist()), strict=True):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + response])).logits[0, len(prompt) - 1:-1] / temperature
        want = torch.log_softmax(logits, -1).gather(1, torch.tensor(response)[:, None]).squeeze(1)
        assert torch.allclose(lp, want, atol=1e-4), (lp - want).abs().max()


def test_ignore_eos_masks_the_end_of_sequence_id_logprobs_included(engine, folders):
    """Under ignore_eos sglang neither stops at nor masks the end-of-sequence id; the adapter masks it. Made the
    greedy choice here (the id greedy decoding picks first), so an unmasked id is picked at once."""
    hf = _hf(folders[0])
    first = hf.generate(PROMPTS[:1], greedy=True, max_new_tokens=1).responses()[0][0]
    adapter, hf.eos_id = SGLangEngine(engine.engine, eos_id=first), first
    got = adapter.generate(PROMPTS[:1], greedy=True, max_new_tokens=8, ignore_eos=True)
    want = hf.generate(PROMPTS[:1], greedy=True, max_new_tokens=8, ignore_eos=True)
    assert first not in got.responses()[0] and len(got.responses()[0]) == 8
    assert got.responses() == want.responses()
    assert torch.allclose(got.logprobs, want.logprobs, atol=1e-4), (got.logprobs - want.logprobs).abs().max()


def test_an_update_outside_a_weight_update_session_is_refused_by_sglang(engine, folders):
    state = _perturbed(folders[0])
    ok, message = engine.engine.update_weights_from_tensor(named_tensors=list(state.items()), load_format=None,
                                                           flush_cache=True)
    assert not ok and message, message


def test_release_resume_and_a_weight_update_change_the_outputs_as_the_new_weights_should(engine, folders):
    """The colocated order: generate -> release the KV cache at once (flush until idle first; on the CPU the
    release itself is not sent: SGLangEngine.releases_memory) -> update the weights through begin / flattened
    buckets / end -> resume -> generate: the outputs are the new weights'."""
    before = engine.generate(PROMPTS, greedy=True, max_new_tokens=12)
    engine.release_memory(["kv_cache", "cuda_graph"])
    state = _perturbed(folders[0])
    assert engine.load_weights(_update(5, state)) == 5 and engine.weight_version() == 5
    engine.resume_memory()
    got = engine.generate(PROMPTS, greedy=True, max_new_tokens=12)
    want = _hf(folders[0], state).generate(PROMPTS, greedy=True, max_new_tokens=12)
    assert got.responses() != before.responses(), "the update changed nothing"
    assert got.responses() == want.responses() and got.policy_version == 5
    assert torch.allclose(got.logprobs, want.logprobs, atol=1e-4), (got.logprobs - want.logprobs).abs().max()
    # named tensors (sglang serialises them itself), back to the original weights
    original = AutoModelForCausalLM.from_pretrained(folders[0], dtype=torch.float32).state_dict()
    engine.load_weights(TensorBucketUpdate(6, buckets=[list(original.items())], load_format=None))
    assert engine.generate(PROMPTS, greedy=True, max_new_tokens=12).responses() == before.responses()


def test_a_shape_folder_starts_on_dummy_weights_and_shutdown_leaves_no_process(folders):
    """The benchmark's random-weight shape folders hold no weights: the engine starts with load_format="dummy"
    and takes its weights from the first sync; shutdown ends every process the engine started."""
    assert engine_kwargs(str(folders[1]), mem_fraction_static=0.5)["load_format"] == "dummy"
    assert "load_format" not in engine_kwargs(str(folders[0]), mem_fraction_static=0.5)
    process = _start(folders[1])
    try:
        tree = [process.process.pid, *(c.pid for c in psutil.Process(process.process.pid).children(recursive=True))]
        assert len(tree) >= 2, "sglang starts its scheduler in a process of its own"
        adapter = SGLangEngine(process, eos_id=EOS, releases_memory=False)
        original = AutoModelForCausalLM.from_pretrained(folders[0], dtype=torch.float32).state_dict()
        adapter.load_weights(_update(1, original))
        want = _hf(folders[0]).generate(PROMPTS, greedy=True, max_new_tokens=8)
        assert adapter.generate(PROMPTS, greedy=True, max_new_tokens=8).responses() == want.responses()
        process.shutdown()
        _, alive = psutil.wait_procs([psutil.Process(p) for p in tree if psutil.pid_exists(p)], timeout=60)
        assert not alive, f"left behind: {[p.pid for p in alive]}"
    finally:
        process.kill()
