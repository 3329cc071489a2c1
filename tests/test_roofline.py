"""Roofline counts (opd/roofline.py) against independent counts: parameter tensors of real models and
torch's FlopCounterMode on tiny models' forward, backward, generation and the chunked loss."""

import json

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoConfig, AutoModelForCausalLM, Qwen2Config, Qwen3Config

from opd.kernels.chunked import chunked_divergence
from opd import roofline
from opd.roofline import DecoderShape, Workload


class _InPlaceAddmm(TorchDispatchMode):
    """FlopCounterMode has no formula for in-place `addmm_` (the chunked kernel's weight-gradient product):
    count those calls from their shapes."""

    flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.addmm_.default:
            m, k = args[1].shape
            self.flops += 2 * m * k * args[2].shape[1]
        return func(*args, **(kwargs or {}))


def _counted(fn) -> int:
    with FlopCounterMode(display=False) as counter, _InPlaceAddmm() as in_place:
        fn()
    return counter.get_total_flops() + in_place.flops


def _tiny(cls=Qwen3Config, **kw):
    config = cls(vocab_size=1031, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=24, tie_word_embeddings=False, max_position_embeddings=256,
                 **kw)
    config._attn_implementation = "eager"  # FlopCounterMode counts eager attention's matmuls (the full square)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval(), config


@pytest.mark.parametrize("name", ["qwen2.5-1.5b-instruct", "qwen2.5-7b-instruct", "qwen3-1.7b", "qwen3-8b"])
def test_params_match_the_model_tensors(root, name):
    config = AutoConfig.for_model(**json.loads((root / "assets" / "shapes" / f"{name}.json").read_text()))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    # the independent count: every 2-D weight (embeddings, projections, head); norms and biases are 1-D
    counted = sum(p.numel() for p in model.parameters() if p.dim() == 2)
    assert DecoderShape.of(config).params == counted
    assert DecoderShape.of(json.loads((root / "assets" / "shapes" / f"{name}.json").read_text())).params == counted


@pytest.mark.parametrize("cls", [Qwen3Config, Qwen2Config])
def test_forward_and_backward_flops(cls):
    model, config = _tiny(cls)
    shape = DecoderShape.of(config)
    b, t = 3, 37
    ids = torch.randint(0, config.vocab_size, (b, t))
    with torch.no_grad():
        forward = _counted(lambda: model(input_ids=ids))
    expected = roofline.forward_flops(shape, [t] * b, head=True, causal=False)
    assert forward == pytest.approx(expected, rel=1e-9)

    decoder = model.get_decoder()
    both = _counted(lambda: decoder(input_ids=ids).last_hidden_state.sum().backward())
    # backward = input and weight gradients of every product: twice the forward (the rotary product has no grad)
    expected = 3 * roofline.forward_flops(shape, [t] * b, causal=False)
    assert both == pytest.approx(expected, rel=1e-9)
    # the causal count is the lower triangle only
    full, causal = (roofline.forward_flops(shape, [t], causal=c) for c in (False, True))
    assert full - causal == 4 * shape.layers * shape.heads * shape.head_dim * (t * t - t * (t + 1) // 2)


def test_rollout_flops_match_generate():
    model, config = _tiny()
    shape = DecoderShape.of(config)
    b, p, r = 2, 9, 12
    ids = torch.randint(2, config.vocab_size, (b, p))
    with torch.no_grad():
        counted = _counted(lambda: model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                                  max_new_tokens=r, min_new_tokens=r, pad_token_id=0, eos_token_id=1))
    cost = roofline.rollout_cost(shape, Workload(b, p, r), 4, "float32")
    # eager prefill computes the full square of prompt scores, the roofline the causal half
    square_minus_causal = 4 * shape.layers * shape.heads * shape.head_dim * b * (p * p - p * (p + 1) // 2)
    assert counted == pytest.approx(cost.flops + square_minus_causal, rel=1e-9)


@pytest.mark.parametrize("canary", [False, True])
def test_loss_flops_match_the_chunked_kernel(canary):
    n, d_s, d_t, v = 300, 256, 384, 4099
    shape_s = DecoderShape(vocab=v, hidden=d_s, layers=1, heads=1, kv_heads=1, head_dim=d_s, intermediate=1, tied=True)
    shape_t = DecoderShape(vocab=v, hidden=d_t, layers=1, heads=1, kv_heads=1, head_dim=d_t, intermediate=1, tied=True)
    h_s = torch.randn(n, d_s, requires_grad=True)
    w_s = (0.05 * torch.randn(v, d_s)).requires_grad_()
    h_t, w_t = torch.randn(n, d_t), 0.05 * torch.randn(v, d_t)

    def step():
        loss, _ = chunked_divergence(h_s, w_s, h_t, w_t, torch.ones(n), kind="rkl", num_tokens=n, chunk_size=64)
        loss.backward()
        if canary:
            with torch.no_grad():
                torch.log_softmax(h_s @ w_s.T, -1)

    counted = _counted(step)
    expected = roofline.loss_flops(shape_s, shape_t, n, canary=canary)
    # the kernel's row sums are [C, V] x [V] products (a few 2 N V terms) beside the 2 N V d projections
    assert counted == pytest.approx(expected, rel=0.01)
    assert counted >= expected


def test_bound_picks_the_slower_roof_and_the_device_table():
    peak = roofline.lookup_gpu("NVIDIA H20")
    assert peak is roofline.DEVICE_PEAKS["h20"]
    assert roofline.lookup_gpu("NVIDIA H200") is roofline.DEVICE_PEAKS["h200"]
    assert roofline.lookup_gpu("NVIDIA H100 80GB HBM3") is roofline.DEVICE_PEAKS["h100"]
    assert roofline.lookup_gpu("Tesla T4") is None
    memory_heavy = roofline.bound(roofline.Cost(1e12, 8e12, "bfloat16"), peak)  # 1e12 / 148e12 vs 8e12 / 4e12
    assert memory_heavy["bound_by"] == "memory" and memory_heavy["bound_s"] == pytest.approx(2.0)
    compute_heavy = roofline.bound(roofline.Cost(296e12, 4e9, "bfloat16"), peak)
    assert compute_heavy["bound_by"] == "compute" and compute_heavy["bound_s"] == pytest.approx(2.0)
    link = roofline.bound(roofline.Cost(0.0, 9e11, "float32", bandwidth="link"), peak)
    assert link["bound_s"] == pytest.approx(1.0)
    set_peak = roofline.with_settings(peak, 100.0, 1000.0)
    assert set_peak.flops_for("bfloat16") == 100e12 and set_peak.memory_bytes_per_s == 1e12



def test_a_working_set_a_cache_holds_is_bound_by_the_cache_read_rate():
    """A phase that reads the same bytes again and again (the rollout's decode steps) is bound by the read rate of
    the smallest measured cache size holding its working set, never by less than memory's; a phase without a
    working set, or one larger than every size, by memory. A bandwidth set by hand replaces them all."""
    peak = roofline.DevicePeak("cpu", {"float32": 1e12}, 10e9, 10e9, "measured",
                               ((8 << 20, 30e9), (64 << 20, 20e9), (128 << 20, 5e9)))
    cases = {0: 10e9, 1 << 20: 30e9, 8 << 20: 30e9, (8 << 20) + 1: 20e9, 100 << 20: 10e9, 1 << 30: 10e9}
    for working_set, rate in cases.items():
        roof = roofline.bound(roofline.Cost(1.0, 60e9, "float32", working_set=working_set), peak)
        assert roof["bytes_per_s"] == rate and roof["memory_s"] == pytest.approx(60e9 / rate)
        assert roof["bound_by"] == ("cache" if rate > 10e9 else "memory")
    assert roofline.with_settings(peak, 0.0, 50.0).bandwidth_for(1 << 20) == 50e9
    shape = DecoderShape(vocab=1000, hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, intermediate=128,
                         tied=True)
    cost = roofline.rollout_cost(shape, Workload(3, 10, 20), 4, "float32")
    weights = 4 * (shape.layers * shape.layer_matmul_params + shape.head_params)
    assert cost.working_set == weights + 3 * shape.kv_bytes_per_token(4) * 30


def test_measured_cpu_peaks_are_positive_and_cover_the_probe_sizes():
    peak = roofline.measure_cpu(1, size=128, repeats=1)
    assert peak.source == "measured" and peak.flops_for("float32") > 0 and peak.memory_bytes_per_s > 0
    assert [size for size, _ in peak.cache_reads] == [mib << 20 for mib in roofline.CACHE_PROBE_MIB]
    assert all(rate > 0 for _, rate in peak.cache_reads)

def test_optimizer_and_sync_bytes():
    shape = DecoderShape.of({"vocab_size": 100, "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
                             "intermediate_size": 16, "tie_word_embeddings": True})
    # 100 x 8 tied embedding + q, k, v, o (8 x 8 each) + 3 x 8 x 16
    assert shape.params == 800 + 4 * 64 + 384
    assert roofline.optimizer_cost(shape).bytes == 40 * shape.params
    assert roofline.sync_cost(shape, "cpu", 2).bytes == 0
    assert roofline.sync_cost(shape, "colocated", 2).bytes == 6 * shape.params
    assert roofline.sync_cost(shape, "split", 2).bandwidth == "link"
