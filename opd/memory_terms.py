"""A memory plan's terms: what each actor holds, in bytes, for a config, the models' shapes and the step.

* **persistent** terms, held for the whole run: weights, AdamW's two fp32 moments, the serving
  buffer, the teacher's fp32 output head, the hidden states the teacher's outbox keeps, a framework overhead
  (CUDA context on a GPU, the Python + torch + transformers baseline of a process on the CPU);
* **step** terms, alive only during the actor's phase: activations, loss blocks, forward transients, KV cache,
  received hidden states.

What each term grows with (the point of the token budgets, DESIGN.md "Scale"):

* the learner's activations, attention mask and response-state gathers grow with the tokens of ONE micro-batch
  `m = learner.micro_batch_tokens` (the whole step's tokens when it is 0), not with the batch; the mask, when a
  micro-batch packs several sequences (sdpa / eager), with `m^2`;
* the teacher's forward transients likewise with `m = teacher.micro_batch_tokens`;
* the loss's blocks with `loss.chunk_size x V` and the output heads `V x d`: fixed;
* the teacher's states leave one learner micro-batch at a time (TeacherActor.score is a streaming generator): in
  cpu mode through the object store, so both sides hold one part (the object store holds the step's); the GPU
  transports still keep the step's `[response tokens, d_t]` on the teacher's device until the learner has taken
  them (colocated: IPC mappings of the last two batches; split: sends that wait for the learner's receives), and
  the rollout's KV cache grows with the batch: they are the data, not a transient of the computation.

The per-token activation formulas come from what a transformers decoder layer (Llama / Qwen2 / Qwen3 style, sdpa)
saves for backward, counted with a saved-tensors hook and checked against the peak resident set on CPU
(`scripts/measure_step_memory.py`, docs/memory_plan.md). fp32 compute saves per token and layer: the layer's
input, the normalised input and the norm's output, twice (6d); q, the repeated k and v and the attention output
(4 H hd: a packed row has a mask, so transformers repeats the KV heads for sdpa); the MLP's gate, act(gate), up and
their product (4I); the attention's log-sum-exp (H). bf16 autocast keeps the norms' four fp32 tensors (16 bytes x
d) and the rest in bf16, plus bf16 copies of every layer's weights, which autocast caches for the forward.
Measured at the Qwen2.5-1.5B widths (fp32): 206.7 KiB per token and layer against 204.8 from the formula.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from opd.config import Config
from opd.memory_device import GIB, Device
from opd.memory_shapes import Arch, Step

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
CUDA_CONTEXT_BYTES = GIB // 2  # per process on its GPU (context, cuBLAS workspace, kernels)
# per actor process on the CPU: Python + torch + transformers + the project (405 MiB measured here after the
# imports, docs/memory_plan.md) plus a Ray worker's own share
CPU_PROCESS_BYTES = 512 << 20
# calibrated on CPU (docs/memory_plan.md): the backward's transient gradients of the MLP intermediates, [m, I] each
BACKWARD_INTERMEDIATES = 1.8
LOSS_BLOCKS = 6  # [chunk, V] fp32 blocks alive at once in the chunked loss (tests/test_kernel_memory.py: 5 to 7)


@dataclass(frozen=True)
class Term:
    name: str
    bytes: int
    grows_with: str  # "model", "vocabulary", "micro-batch tokens", "step tokens", ...
    persistent: bool = False  # held between phases; else only during one of the actor's phases
    setting: str = ""  # the setting that shrinks it
    phase: str = "step"  # an actor's phases run one after another: their terms do not add up


@dataclass(frozen=True)
class ActorPlan:
    role: str
    terms: tuple[Term, ...]

    @property
    def persistent_bytes(self) -> int:
        return sum(t.bytes for t in self.terms if t.persistent)

    @property
    def step_bytes(self) -> int:
        """The largest of the actor's phases (its training step, an evaluation, ...)."""
        phases: dict[str, int] = {}
        for t in self.terms:
            if not t.persistent:
                phases[t.phase] = phases.get(t.phase, 0) + t.bytes
        return max(phases.values(), default=0)

    @property
    def peak_bytes(self) -> int:
        return self.persistent_bytes + self.step_bytes

    def breakdown(self) -> dict[str, int]:
        return {t.name: t.bytes for t in self.terms}


def decoder_saved_per_token(a: Arch, compute: str, attn: str) -> int:
    """Bytes one decoder layer saves for backward per token (see the module docstring for the tensors)."""
    s = a.shape
    d, q, kv, inter = s.hidden, s.heads * s.head_dim, s.kv_heads * s.head_dim, s.intermediate
    attn_elems = q + 2 * kv + q if attn == "flash_attention_2" else 4 * q  # sdpa / eager repeat the KV heads
    qk = (2 * q + 2 * kv) * 4 if a.qk_norm else 0  # the q / k norms' fp32 input and output
    if compute == "bfloat16":  # autocast: the norms' tensors stay fp32, the linears' inputs are bf16 casts
        return 16 * d + 4 * s.heads + 2 * (5 * d + attn_elems + 4 * inter) + qk
    return 4 * (6 * d + attn_elems + 4 * inter + s.heads) + qk


def learner_activation_terms(a: Arch, m: int, n: int, packed: bool, *, compute: str, checkpointing: bool,
                             attn: str) -> tuple[list[Term], int, int]:
    """The student's forward + backward over one micro-batch of `m` tokens (`n` of them predict responses): the
    terms alive when the loss runs, the backward's working set per micro-batch (each layer's gradient
    intermediates; with checkpointing also the recomputed layer's activations and its autocast copies), and the
    autocast copies of all layers that a checkpointed forward holds until it returns (before the loss runs)."""
    s, act = a.shape, DTYPE_BYTES[compute]
    layer = decoder_saved_per_token(a, compute, attn)
    casts = s.layer_matmul_params * 2 if compute == "bfloat16" else 0  # one layer's weights cast to bf16
    # checkpointing keeps each layer's fp32 input and recomputes one layer at a time in backward
    kept = s.layers * s.hidden * 4 if checkpointing else s.layers * layer
    outside = 2 * s.hidden * 4 + 2 * s.head_dim * 4 + 8  # final norm, rotary cos / sin, ids
    working = m * int(BACKWARD_INTERMEDIATES * s.intermediate * act) + ((m * layer + casts) if checkpointing else 0)
    knob = "learner.micro_batch_tokens" + ("" if checkpointing else " / learner.gradient_checkpointing")
    terms = [Term("activations", m * (kept + outside) + n * s.hidden * 4, "micro-batch tokens", setting=knob)]
    if attn == "eager":  # the softmax's [H, m, m] saved by every layer
        terms.append(Term("attention scores", (1 if checkpointing else s.layers) * s.heads * m * m * act,
                          "micro-batch tokens^2", setting="model.attn_implementation=sdpa"))
    if packed and attn != "flash_attention_2":  # one mask for the row: bool + sdpa's additive copy (saved)
        terms.append(Term("attention mask", m * m * (1 + act), "micro-batch tokens^2",
                          setting="learner.micro_batch_tokens"))
    if casts and not checkpointing:  # autocast's cache: bf16 copies of every layer's weights, saved for backward
        terms.append(Term("autocast weight copies", s.layers * casts, "model"))
    return terms, working, s.layers * casts if checkpointing else 0


def forward_transient_bytes(a: Arch, m: int, packed: bool, dtype_bytes: int, attn: str) -> int:
    """A no-grad forward over `m` tokens: at the MLP, gate / act / up / product ([m, I], three alive) and a few
    [m, d] (residual, norm) in the model's dtype; a packed row's bool mask. Calibrated on CPU (docs/memory_plan.md):
    137 KiB per token at the Qwen2.5-7B widths in bf16 against 142 from the formula, and independent of the
    number of layers (nothing of a finished layer is kept)."""
    s = a.shape
    total = m * (3 * s.intermediate + 4 * s.hidden) * dtype_bytes
    if packed and attn != "flash_attention_2":
        total += m * m
    if attn == "eager":
        total += s.heads * m * m * dtype_bytes
    return total


def generate_terms(a: Arch, num_seqs: int, prompt: int, new: int, dtype_bytes: int, *, on_gpu: bool,
                   attn: str, what: str, kv_setting: str, phase: str = "step",
                   max_batch_tokens: int = 0) -> list[Term]:
    """`generate` over `num_seqs` left-padded sequences: the KV cache, the prefill's forward over the whole
    padded batch, per-step [B, V] fp32 logits; on the CPU transformers' `generate(output_scores=True)` keeps
    every step's [B, V] fp32 scores and `compute_transition_scores` two more copies (the GPU decode loop
    keeps none). `max_batch_tokens` (rollout.max_batch_tokens): the rows decode in waves of at most that many
    KV-cache tokens, so the terms follow one wave's rows."""
    s = a.shape
    if max_batch_tokens > 0:
        num_seqs = min(num_seqs, max(1, max_batch_tokens // (prompt + new)))
    kv_cache = num_seqs * (prompt + new) * s.kv_bytes_per_token(dtype_bytes)
    kv_cache += kv_cache // max(1, s.layers)  # DynamicCache grows by torch.cat: one layer's old and new copy
    prefill = num_seqs * forward_transient_bytes(a, prompt, False, dtype_bytes, attn) + num_seqs * prompt * prompt
    logits = 4 * num_seqs * s.vocab * 4
    terms = [Term(f"{what} KV cache", kv_cache, "sequences x (prompt + new tokens)", setting=kv_setting,
                  phase=phase),
             Term(f"{what} prefill", prefill + logits, "sequences x prompt tokens", setting=kv_setting, phase=phase)]
    if not on_gpu:
        terms.append(Term(f"{what} scores", 3 * new * num_seqs * s.vocab * 4, "sequences x new tokens x vocabulary",
                          setting=kv_setting, phase=phase))
    return terms


# ---------------------------------------------------------------- each actor's terms


@dataclass(frozen=True)
class _Common:
    """What the three actors' terms share, derived once from the config, the shapes, the step and the device."""

    mode: str
    dtype_bytes: int  # model.dtype: the teacher's and the engines' weights
    on_gpu: bool
    attn: str
    compute: str  # learner.compute_dtype
    framework: Term  # the CUDA context or a process's baseline
    full_vocab: bool  # a full-vocabulary loss (the teacher sends hidden states), not sampled_rkl (log-probs)
    state_bytes: int  # per response token from the teacher: hidden states, or one fp32 log-prob
    valid_vocab: int
    blocks: int  # the chunked loss's [chunk, V] fp32 blocks
    micro_batch: tuple[int, int, bool]  # the learner's largest micro-batch: (tokens, response tokens, packed)


def _common(cfg: Config, student: Arch, teacher: Arch, step: Step, device: Device) -> _Common:
    from opd.kernels.chunked import default_chunk_size

    on_gpu = device.kind == "cuda"
    b = DTYPE_BYTES[cfg.model.dtype]
    s, t = student.shape, teacher.shape
    full_vocab = cfg.loss.kind != "sampled_rkl"
    valid_vocab = min(s.vocab, t.vocab)
    chunk = cfg.loss.chunk_size or default_chunk_size(valid_vocab, s.hidden, "cuda" if on_gpu else "cpu")
    m, n, packed = step.micro_batch(cfg.learner.micro_batch_tokens)
    return _Common(
        mode=cfg.run.mode, dtype_bytes=b, on_gpu=on_gpu, attn=cfg.model.attn_implementation or "sdpa",
        compute=getattr(cfg.learner, "compute_dtype", "float32"),
        framework=Term("CUDA context" if on_gpu else "process baseline",
                       CUDA_CONTEXT_BYTES if on_gpu else CPU_PROCESS_BYTES, "fixed", True),
        full_vocab=full_vocab, state_bytes=t.hidden * b if full_vocab else 4, valid_vocab=valid_vocab,
        blocks=LOSS_BLOCKS * min(chunk, n) * valid_vocab * 4,  # a chunk is at most the micro-batch's responses
        micro_batch=(m, n, packed))


def actor_plans(cfg: Config, student: Arch, teacher: Arch, step: Step, device: Device) -> dict[str, ActorPlan]:
    """Each actor's terms (one replica of each, with its share of the sequences)."""
    c = _common(cfg, student, teacher, step, device)
    learner = _learner_held(cfg, student, teacher, c) + _learner_step(cfg, student, teacher, step, c)
    return {"rollout": ActorPlan("rollout", tuple(_rollout_terms(cfg, student, step, device, c))),
            "teacher": ActorPlan("teacher", tuple(_teacher_terms(cfg, teacher, step, c))),
            "learner": ActorPlan("learner", tuple(learner))}


def _learner_shard_bytes(cfg: Config, student: Arch) -> int:
    """This replica's fp32 master weights (run.learner_replicas=N: each replica its 1/N shard, FSDP2)."""
    return math.ceil(student.params * 4 / cfg.run.learner_replicas)


def _learner_held(cfg: Config, student: Arch, teacher: Arch, c: _Common) -> list[Term]:
    """The learner's terms before its activations: fp32 master weights, grads and AdamW's two moments, the serving
    buffer, FSDP's gathered units, the teacher's head and the teacher states it receives."""
    s, t, b, k = student.shape, teacher.shape, c.dtype_bytes, cfg.run.learner_replicas
    p4 = _learner_shard_bytes(cfg, student)
    # the gradients live from the first micro-batch's backward to the optimizer step, which frees them
    # (zero_grad(set_to_none=True) after it): not through the rollout and the teacher's phases
    learner = [Term("weights", p4, "model", True), Term("grads", p4, "model", phase="optimizer"),
               Term("optimizer", 2 * p4, "model", True), c.framework]
    if c.mode != "cpu" or k > 1:  # the flat copy the engines read (model.dtype; cpu mode fp32), whole on every replica
        learner.append(Term("serving buffer", student.params * (b if c.mode != "cpu" else 4), "model", True))
    if k > 1:  # FSDP's gathered units while they compute: the root (embeddings, output head, kept gathered through
        # the step) and two decoder layers (one prefetched), their parameters and unsharded gradients
        layer = (student.params - s.head_params * (1 if s.tied else 2) - s.hidden) // max(1, s.layers)
        gathered = student.params - s.layers * layer + 2 * layer
        gathered_bytes = 2 if c.on_gpu and c.compute == "bfloat16" else 4
        learner.append(Term("gathered by FSDP", gathered * (gathered_bytes + 4), "model"))
    learner.append(Term("teacher head", t.vocab * t.hidden * c.dtype_bytes, "vocabulary", True))  # model.dtype
    if c.mode != "colocated":  # one micro-batch's part at a time; colocated maps the teacher's tensor (no copy)
        learner.append(Term("received teacher states", c.micro_batch[1] * c.state_bytes, "micro-batch tokens",
                            setting="learner.micro_batch_tokens"))
    return learner


def _learner_step(cfg: Config, student: Arch, teacher: Arch, step: Step, c: _Common) -> list[Term]:
    """The learner's step over one micro-batch at a time: activations, the loss, the layers' backward."""
    s, t, lc = student.shape, teacher.shape, cfg.learner
    m, n, packed = c.micro_batch
    learner, working, forward_casts = learner_activation_terms(
        student, m, n, packed, compute=c.compute, checkpointing=lc.gradient_checkpointing, attn=c.attn)
    # The loss's forward computes d loss / d w_s ([V, d] fp32, saved) beside a few [chunk, V] fp32 blocks per chunk;
    # its backward returns a scaled copy of that gradient; the peak is the larger of the two. With bf16 compute the
    # forward's GEMM operands are copies of both output weights (bf16 on a GPU; on the CPU bf16-rounded and widened
    # back to fp32), freed when it returns; the fp32 weights are used as they are otherwise. Per response token:
    # d loss / d h_s and its scaled copy.
    head = s.vocab * s.hidden * 4
    copies = 0
    if c.full_vocab:  # the GEMM operands the loss makes of the two output weights (opd/kernels/chunked.py _operand)
        if c.compute == "bfloat16":  # bf16 copies on a GPU, bf16-rounded fp32 ones on the CPU; a bf16 teacher head
            # is used as it is on a GPU
            teacher_copy = 0 if c.on_gpu and c.dtype_bytes == 2 else c.valid_vocab * t.hidden * (2 if c.on_gpu else 4)
            copies = c.valid_vocab * s.hidden * (2 if c.on_gpu else 4) + teacher_copy
        elif c.dtype_bytes != 4:  # fp32 compute: the teacher's head (model.dtype) widened to fp32
            copies = c.valid_vocab * t.hidden * 4
    loss_peak = max(c.blocks + head, 2 * head)
    learner.append(Term("loss blocks", loss_peak + n * 2 * s.hidden * 4,
                        "vocabulary x loss.chunk_size", setting="loss.chunk_size"))
    if copies:  # what they add to the loss's peak
        learner.append(Term("output weight copies", max(0, c.blocks + head + copies - loss_peak), "vocabulary"))
        loss_peak = max(loss_peak, c.blocks + head + copies)
    # The layers' backward comes after the loss's: its working set overlaps one [V, d] gradient (a tied head's share
    # waits there for the embedding's), not the loss's peak; a checkpointed forward's autocast copies are gone
    # before the loss runs. Only what exceeds the loss's peak adds (measured: docs/memory_plan.md).
    knob = "learner.micro_batch_tokens" + ("" if lc.gradient_checkpointing else " / learner.gradient_checkpointing")
    learner.append(Term("backward working set", max(0, head + working - loss_peak, forward_casts - loss_peak),
                        "micro-batch tokens", setting=knob))
    if m < step.tokens:
        # Several micro-batches: the first one's backward made the gradients, which the next ones' activations
        # meet. With one, backward builds them as the activations are freed: not there at the activations' peak
        # (measured: docs/memory_plan.md).
        learner.append(Term("grads of earlier micro-batches", _learner_shard_bytes(cfg, student), "model"))
    if not c.on_gpu:  # the CPU's single-tensor AdamW: a temporary the size of the largest parameter, after backward
        learner.append(Term("optimizer step", 2 * s.vocab * s.hidden * 4, "model", phase="optimizer"))
    return learner


def _teacher_terms(cfg: Config, teacher: Arch, step: Step, c: _Common) -> list[Term]:
    """The teacher: weights in model.dtype; one packed row of teacher.micro_batch_tokens at a time, no activations
    kept; the states it returns; its greedy answers to the held-out prompts (evaluation)."""
    t, b, n = teacher.shape, c.dtype_bytes, c.micro_batch[1]
    tm, tn, tpacked = step.micro_batch(cfg.teacher.micro_batch_tokens,
                                       math.ceil(step.num_sequences / cfg.run.teacher_replicas))
    terms = [Term("weights", teacher.params * b, "model", True), c.framework]
    if c.mode == "cpu":  # hidden states through the object store (opd/modes.py hidden_transport)
        # streamed: a row's states until its micro-batches' parts are yielded, and the part being yielded
        terms.append(Term("states in flight", (tn + n) * c.state_bytes, "micro-batch tokens",
                          setting="teacher.micro_batch_tokens / learner.micro_batch_tokens"))
    else:  # ipc: the outbox keeps the last two batches' parts; collective: the step's parts wait for the send
        held = 2 if c.mode == "colocated" else 1
        teacher_responses = math.ceil(step.num_sequences * step.response_tokens / cfg.run.teacher_replicas)
        terms.append(Term("returned states", held * teacher_responses * c.state_bytes, "step response tokens",
                          held == 2, setting="train.prompts_per_step"))
    forward = forward_transient_bytes(teacher, tm, tpacked, b, c.attn)
    if not c.full_vocab:  # chunked_token_logprobs widens the teacher's output weight to fp32
        forward += (t.vocab * t.hidden * 4 if b != 4 else 0) + c.blocks
    terms.append(Term("forward transients", forward, "teacher micro-batch tokens",
                      setting="teacher.micro_batch_tokens"))
    # evaluation: the teacher's greedy answers to the held-out prompts, with its own KV cache
    terms += generate_terms(teacher, math.ceil(cfg.data.num_eval_prompts / cfg.run.teacher_replicas),
                            step.prompt_tokens, step.response_tokens, b, on_gpu=c.on_gpu, attn=c.attn,
                            what="eval", kv_setting="rollout.max_batch_tokens / data.num_eval_prompts", phase="eval",
                            max_batch_tokens=cfg.rollout.max_batch_tokens)
    return terms


def _rollout_terms(cfg: Config, student: Arch, step: Step, device: Device, c: _Common) -> list[Term]:
    """The rollout: the student (cpu: views of the learner's fp32 buffer; colocated: of its serving buffer, both
    counted in the learner), its KV cache and prefill while it generates."""
    r, b = cfg.rollout, c.dtype_bytes
    rollout = [c.framework]
    if r.engine == "sglang":
        # weights and KV cache inside mem_fraction of the GPU (what is free at its start). The rollout actor releases
        # the KV cache and CUDA graphs after each generate and resumes them before the next (the memory saver):
        # only the weights are held through the teacher's and learner's phases.
        reserved, weights = int(r.mem_fraction * device.total_bytes), student.params * b
        rollout.append(Term("sglang weights", weights, "model", True))
        rollout.append(Term("sglang KV cache and graphs", max(0, reserved - weights), "GPU memory",
                            setting="rollout.mem_fraction"))
        return rollout
    if c.mode == "split":
        rollout.append(Term("weights", student.params * b, "model", True))
    seqs = max(step.num_sequences, step.num_eval_sequences)
    rollout += generate_terms(student, math.ceil(seqs / cfg.run.rollout_replicas), step.prompt_tokens,
                              step.response_tokens, 4 if c.mode == "cpu" else b, on_gpu=c.on_gpu, attn=c.attn,
                              what="generate", kv_setting="rollout.max_batch_tokens",
                              max_batch_tokens=r.max_batch_tokens)
    return rollout
