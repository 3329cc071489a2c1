"""Roofline estimates for each phase of an OPD step: FLOPs and bytes moved, against a device's peaks.

The bound of a phase is `max(flops / peak_flops, bytes / peak_bandwidth)`: no implementation can beat it, so
`bound_s / measured_s` says how far a phase is from the limit (1.0 = at the roof). Counts are of the work a
phase must do, not of what a given implementation does:

* FLOPs are those of the matrix products (2 per multiply-add); norms, activations, softmax and sampling are
  left out (a few percent at these widths). Attention is counted over the causal half of the score matrix
  (`T (T + 1) / 2` query-key pairs per head) unless `causal=False` (what eager attention computes).
* Bytes are the compulsory ones: every weight read once per pass, the KV cache read at every decode step,
  optimizer state read and written once. Activations that a fused implementation keeps on chip are not counted.

Shapes come from a Hugging Face decoder config (Llama / Qwen2 / Qwen3 style: GQA, SwiGLU, optional QKV bias).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

# ---------------------------------------------------------------- model shape


@dataclass(frozen=True)
class DecoderShape:
    vocab: int  # output rows (config.vocab_size, padding included)
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    tied: bool  # output head shares the embedding matrix

    @classmethod
    def of(cls, config) -> DecoderShape:
        """From a transformers PretrainedConfig or its config.json dict."""
        get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
        heads = get("num_attention_heads")
        return cls(vocab=get("vocab_size"), hidden=get("hidden_size"), layers=get("num_hidden_layers"), heads=heads,
                   kv_heads=get("num_key_value_heads") or heads,
                   head_dim=get("head_dim") or get("hidden_size") // heads,
                   intermediate=get("intermediate_size"), tied=bool(get("tie_word_embeddings", False)))

    @property
    def layer_matmul_params(self) -> int:
        """Weights of one layer's matrix products: q, k, v, o projections and the SwiGLU MLP (gate, up, down)."""
        d, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        return d * q + 2 * d * kv + q * d + 3 * d * self.intermediate

    @property
    def head_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def params(self) -> int:
        """All parameters except norms and biases (a fraction of a percent): embeddings, layers, output head."""
        return self.head_params * (1 if self.tied else 2) + self.layers * self.layer_matmul_params

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes


def attention_pairs(seq_len: int, *, causal: bool = True) -> int:
    """Query-key pairs of one head over a sequence: the causal half (with the diagonal) or the full square."""
    return seq_len * (seq_len + 1) // 2 if causal else seq_len * seq_len


def forward_flops(shape: DecoderShape, seq_lens: list[int], *, head: bool = False, causal: bool = True) -> float:
    """One forward pass over sequences of `seq_lens` tokens: 2 x matmul weights x tokens, plus attention
    (QK^T and AV: 2 products of head_dim per pair and head, 2 FLOPs each). `head`: project every position to
    the vocabulary too."""
    tokens = sum(seq_lens)
    weights = shape.layers * shape.layer_matmul_params + (shape.head_params if head else 0)
    pairs = sum(attention_pairs(t, causal=causal) for t in seq_lens)
    return 2.0 * weights * tokens + 4.0 * shape.layers * shape.heads * shape.head_dim * pairs


# ---------------------------------------------------------------- phases


@dataclass(frozen=True)
class Workload:
    num_sequences: int  # prompts x samples per prompt
    prompt_tokens: int
    response_tokens: int  # fixed length (the benchmark ignores end-of-sequence)

    @property
    def response_total(self) -> int:
        return self.num_sequences * self.response_tokens

    @property
    def seq_lens(self) -> list[int]:
        return [self.prompt_tokens + self.response_tokens] * self.num_sequences


@dataclass(frozen=True)
class Cost:
    flops: float
    bytes: float
    dtype: str  # the dtype whose peak FLOP rate applies
    bandwidth: str = "memory"  # "memory" (device memory) or "link" (between devices)
    working_set: float = 0.0  # bytes the phase reads again and again (a decode step's); 0: each byte once


def rollout_cost(s: DecoderShape, w: Workload, dtype_bytes: int, dtype: str) -> Cost:
    """Prefill of the prompts, then one decode step per response token after the first. Every decode step reads
    all weights once (the batch shares them) and each sequence's KV cache so far; the head runs on the last
    position only. Memory-bound at small batch: bytes, not FLOPs, set the roof."""
    b, p, r = w.num_sequences, w.prompt_tokens, w.response_tokens
    prefill = forward_flops(s, [p] * b) + 2.0 * s.head_params * b
    decode_steps = r - 1
    contexts = [p + i for i in range(1, r)]  # context length seen by decode step i (the new token included)
    decode = decode_steps * b * 2.0 * (s.layers * s.layer_matmul_params + s.head_params)
    decode += 4.0 * s.layers * s.heads * s.head_dim * b * sum(contexts)
    weight_bytes = (s.layers * s.layer_matmul_params + s.head_params) * dtype_bytes
    kv = s.kv_bytes_per_token(dtype_bytes)
    bytes_ = (1 + decode_steps) * weight_bytes + b * kv * (sum(contexts) + p + decode_steps)  # reads + writes
    # every decode step reads the same weights and a growing KV cache: a CPU cache that holds them serves them
    return Cost(prefill + decode, bytes_, dtype, working_set=weight_bytes + b * kv * (p + r))


def teacher_cost(s: DecoderShape, w: Workload, dtype_bytes: int, dtype: str) -> Cost:
    """One forward pass over prompt + response (no output head: the learner projects the hidden states it is
    sent, chunk by chunk). Bytes: the weights once, the hidden states of the response positions out (in the
    model's dtype)."""
    flops = forward_flops(s, w.seq_lens)
    bytes_ = s.layers * s.layer_matmul_params * dtype_bytes + w.response_total * s.hidden * dtype_bytes
    return Cost(flops, bytes_, dtype)


def loss_flops(student: DecoderShape, teacher: DecoderShape, num_tokens: int, *, canary: bool = True) -> float:
    """The chunked divergence (opd/kernels/chunked.py): student logits, teacher logits, and the two gradient
    products (hidden states and output weight), all in its forward; `canary`: one more student projection for
    the learner-vs-rollout log-prob check."""
    v = student.vocab
    projections = 3 * student.hidden + teacher.hidden + (student.hidden if canary else 0)
    return 2.0 * num_tokens * v * projections


def learner_cost(student: DecoderShape, teacher: DecoderShape, w: Workload, *, canary: bool = True) -> Cost:
    """Student forward + backward over prompt + response (backward = 2 x forward: input and weight gradients)
    plus the chunked loss. fp32 master weights: read three times (forward, two backward products), gradients
    written once, the teacher's output head read once."""
    flops = 3.0 * forward_flops(student, w.seq_lens) + loss_flops(student, teacher, w.response_total, canary=canary)
    p = student.params - (0 if student.tied else student.head_params)  # the input embedding: a gather, no matmul
    bytes_ = 4 * (3 * p + student.params) + 4 * teacher.head_params
    return Cost(flops, bytes_, "float32")


# AdamW on fp32 parameters, per parameter: gradient-norm clipping reads the gradient (4 B) and scales it in place
# (4 + 4 B); the step reads parameter, gradient and both moments (16 B) and writes parameter and moments (12 B).
ADAMW_BYTES_PER_PARAM = 40
ADAMW_FLOPS_PER_PARAM = 16  # norm (2), scale (1), moments (5), bias-corrected update (~8)


def optimizer_cost(student: DecoderShape) -> Cost:
    return Cost(ADAMW_FLOPS_PER_PARAM * float(student.params), ADAMW_BYTES_PER_PARAM * float(student.params),
                "float32")


def sync_cost(student: DecoderShape, mode: str, serving_bytes: int) -> Cost:
    """cpu: the engine maps the learner's buffer (only the version moves: 0 bytes). colocated: the fp32 master
    weights are cast into the serving buffer (read 4, write `serving_bytes` per parameter). split: the serving
    copy crosses the link between the two devices."""
    p = float(student.params)
    if mode == "cpu":
        return Cost(0.0, 0.0, "float32")
    if mode == "colocated":
        return Cost(0.0, p * (4 + serving_bytes), "float32")
    return Cost(0.0, p * serving_bytes, "float32", bandwidth="link")


# ---------------------------------------------------------------- devices

# Dense peaks (no structured sparsity) from NVIDIA's datasheets: H100 SXM5 (989 TFLOPS BF16, 67 TFLOPS FP32,
# 3.35 TB/s HBM3, 900 GB/s NVLink), H200 SXM (same compute, 4.8 TB/s HBM3e, 900 GB/s NVLink), H20 (148 TFLOPS
# BF16, 44 TFLOPS FP32, 4.0 TB/s HBM3, 900 GB/s NVLink), A100 SXM 80GB (312 TFLOPS BF16, 19.5 TFLOPS FP32,
# 2.039 TB/s HBM2e, 600 GB/s NVLink). FP32 is the CUDA-core rate: torch's default matmul precision does not use
# TF32. Link = NVLink total bandwidth; a pair of PCIe cards gets ~64 GB/s per direction (PCIe Gen5 x16) instead.


@dataclass(frozen=True)
class DevicePeak:
    name: str
    flops: dict  # dtype name -> FLOP/s
    memory_bytes_per_s: float
    link_bytes_per_s: float
    source: str  # "datasheet", "measured" or "setting"
    # (bytes, bytes/s): a working set of that size, read again and again, streams at that rate (measured CPUs: the
    # caches; empty: every working set at memory_bytes_per_s)
    cache_reads: tuple[tuple[int, float], ...] = ()

    def flops_for(self, dtype: str) -> float:
        return self.flops.get(dtype, self.flops["float32"])

    def bandwidth_for(self, working_set: float) -> float:
        """The read rate of a working set of `working_set` bytes read again and again: that of the smallest
        measured size that holds it, never below memory's."""
        fits = [rate for size, rate in self.cache_reads if working_set and working_set <= size]
        return max(fits[0], self.memory_bytes_per_s) if fits else self.memory_bytes_per_s


def _gpu(name: str, bf16_tflops: float, fp32_tflops: float, tb_s: float, link_gb_s: float) -> DevicePeak:
    return DevicePeak(name, {"bfloat16": bf16_tflops * 1e12, "float16": bf16_tflops * 1e12,
                             "float32": fp32_tflops * 1e12}, tb_s * 1e12, link_gb_s * 1e9, "datasheet")


DEVICE_PEAKS: dict[str, DevicePeak] = {
    "h100": _gpu("NVIDIA H100 SXM", 989.0, 67.0, 3.35, 900.0),
    "h200": _gpu("NVIDIA H200 SXM", 989.0, 67.0, 4.8, 900.0),
    "h20": _gpu("NVIDIA H20", 148.0, 44.0, 4.0, 900.0),
    "a100": _gpu("NVIDIA A100 SXM 80GB", 312.0, 19.5, 2.039, 600.0),
}


def lookup_gpu(device_name: str) -> DevicePeak | None:
    """The table entry for a CUDA device name ("NVIDIA H20", "NVIDIA H100 80GB HBM3", ...), or None.
    H200 is matched before H20 (a prefix of it)."""
    for key in ("h200", "h100", "h20", "a100"):
        if re.search(rf"\b{key}\b", device_name.lower()):
            return DEVICE_PEAKS[key]
    return None


CACHE_PROBE_MIB = (4, 8, 16, 32, 48, 64, 96, 128)


def measure_cpu(threads: int, *, size: int = 1024, repeats: int = 5) -> DevicePeak:
    """What this CPU sustains with `threads` torch threads: fp32 matmul rate, memory bandwidth and cache read
    rates (best of `repeats`). A measured roof, not a datasheet one: phases are compared with what torch can reach
    here. Memory: the larger of a copy's rate (one read and one write per element) and a sum's (one read), over
    256 MiB. Cache reads: a sum over buffers of CACHE_PROBE_MIB, each read again and again. On this project's
    2-core VM (2026-12-01) a copy reached 13.3 GB/s and a read of 32 MiB 29: the side-by-side student's decode
    steps, which read the same 42 MB every step, ran faster than a memory-bandwidth bound allowed (116 % of it):
    a bound a phase can beat is no bound."""
    import time

    import torch

    def best(fn) -> float:
        fn()  # warm up
        seconds = math.inf
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            seconds = min(seconds, time.perf_counter() - start)
        return seconds

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(size, size), torch.randn(size, size)
        rate = 2.0 * size ** 3 / best(lambda: torch.mm(a, b))
        src = torch.ones(1 << 26)  # 256 MiB: beyond the caches
        dst = torch.empty_like(src)
        nbytes = src.numel() * src.element_size()
        bandwidth = max(2.0 * nbytes / best(lambda: dst.copy_(src)), nbytes / best(src.sum))
        del src, dst
        cache = []
        for mib in CACHE_PROBE_MIB:
            buf = torch.ones(mib << 18)
            cache.append((mib << 20, buf.numel() * buf.element_size() / best(buf.sum)))
    finally:
        torch.set_num_threads(before)
    return DevicePeak(f"CPU ({threads} thread{'s' if threads > 1 else ''})",
                      {"float32": rate, "bfloat16": rate, "float16": rate}, bandwidth, bandwidth, "measured",
                      tuple(cache))


def with_settings(peak: DevicePeak, tflops: float, gbps: float) -> DevicePeak:
    """`bench.peak_tflops` / `bench.peak_gbps` (0 = keep) replace the table's or the measured values."""
    if not tflops and not gbps:
        return peak
    flops = {k: tflops * 1e12 for k in peak.flops} if tflops else peak.flops
    memory = gbps * 1e9 if gbps else peak.memory_bytes_per_s
    # a bandwidth set by hand is the roof for every working set
    return DevicePeak(peak.name, flops, memory, peak.link_bytes_per_s, "setting", () if gbps else peak.cache_reads)


def bound(cost: Cost, peak: DevicePeak) -> dict:
    """The roofline of one phase: compute time, memory time, the larger one and which it is."""
    compute_s = cost.flops / peak.flops_for(cost.dtype)
    bandwidth = peak.link_bytes_per_s if cost.bandwidth == "link" else peak.bandwidth_for(cost.working_set)
    memory_s = cost.bytes / bandwidth
    by = "memory" if cost.bandwidth == "link" or bandwidth <= peak.memory_bytes_per_s else "cache"
    return {"flops": cost.flops, "bytes": cost.bytes, "compute_s": compute_s, "memory_s": memory_s,
            "bytes_per_s": bandwidth, "bound_s": max(compute_s, memory_s),
            "bound_by": "compute" if compute_s > memory_s else by}


def shape_dict(shape: DecoderShape) -> dict:
    return {**asdict(shape), "params": shape.params}
