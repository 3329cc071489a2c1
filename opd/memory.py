"""A memory plan: each actor's peak bytes for a config on a device, checked before Ray starts.

`plan(cfg, device)` reads the two models' shapes (a local folder's config.json, `assets/shapes/` for the anchors'
hub ids, or the Hugging Face cache; no weights are loaded) and adds up, per actor, what it holds:

* **persistent** terms, held for the whole run: weights, fp32 gradients and AdamW's two fp32 moments, the serving
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

Placement: colocated puts the three actors on one GPU and each phase returns its cached memory when it ends
(opd/actors/common.py `return_cached_memory`), so the GPU needs the persistent terms of all three plus the largest
phase; split puts the learner alone on GPU 0 and rollout + teacher on GPU 1, where nothing is returned between
phases, so GPU 1 needs both actors' peaks; the cpu mode's three processes share the machine's RAM (a warning only).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from opd.config import Config, ConfigError, resolve_path
from opd.modes import uses_gpus
from opd.roofline import DecoderShape

GIB = 1 << 30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
SHAPES_DIR = "assets/shapes"
CUDA_CONTEXT_BYTES = GIB // 2  # per process on its GPU (context, cuBLAS workspace, kernels)
# per actor process on the CPU: Python + torch + transformers + the project (405 MiB measured here after the
# imports, docs/memory_plan.md) plus a Ray worker's own share
CPU_PROCESS_BYTES = 512 << 20
# calibrated on CPU (docs/memory_plan.md): the backward's transient gradients of the MLP intermediates, [m, I] each
BACKWARD_INTERMEDIATES = 1.8
LOSS_BLOCKS = 6  # [chunk, V] fp32 blocks alive at once in the chunked loss (tests/test_kernel_memory.py: 5 to 7)


# ---------------------------------------------------------------- devices and shapes


@dataclass(frozen=True)
class Device:
    """What the plan is checked against: GPUs of one kind (memory per GPU) or the machine's RAM."""

    kind: str  # "cuda" | "cpu"
    name: str
    total_bytes: int  # per GPU, or the machine's RAM
    count: int = 1

    @classmethod
    def gpu(cls, total_bytes: int, name: str = "GPU", count: int = 1) -> Device:
        return cls("cuda", name, int(total_bytes), count)

    @classmethod
    def cpu(cls, total_bytes: int | None = None) -> Device:
        return cls("cpu", "RAM", int(total_bytes if total_bytes is not None else ram_bytes()))


def ram_bytes() -> int:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def detect(cfg: Config) -> Device | None:
    """The device of this machine the config runs on; None when a GPU mode's GPUs are a Ray cluster's."""
    if not uses_gpus(cfg):
        return Device.cpu()
    gpus = _nvidia_smi()
    if not gpus:
        import torch

        if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
            return None  # the GPUs are elsewhere (ray_address): placement finds out
        props = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
        gpus = [(p.name, p.total_memory) for p in props]
    name, total = min(gpus, key=lambda g: g[1])  # the smallest, if they differ
    return Device.gpu(total, name, len(gpus))


def _nvidia_smi() -> list[tuple[str, int]]:
    """(name, total bytes) of the visible GPUs from nvidia-smi: no CUDA context in the driver's process, which
    would otherwise hold GPU memory for the whole run. Empty when nvidia-smi is missing or fails."""
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index,name,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
        rows = [[f.strip() for f in line.split(",")] for line in out.strip().splitlines()]
        gpus = {index: (name, int(float(mib)) << 20) for index, name, mib in rows}
    except (OSError, subprocess.SubprocessError, ValueError):
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and all(v.strip().isdigit() for v in visible.split(",") if v.strip()):
        return [gpus[v.strip()] for v in visible.split(",") if v.strip() in gpus]
    return list(gpus.values())


@dataclass(frozen=True)
class Arch:
    """A decoder's shape plus what the memory terms need beyond roofline's DecoderShape."""

    shape: DecoderShape
    params: int  # all parameters, norms and biases included (a tied head counted once)
    qk_norm: bool  # Qwen3 / Gemma3: RMSNorm on q and k (two more saved tensors per layer)
    source: str  # where the shape came from

    @classmethod
    def of(cls, config: dict, source: str = "") -> Arch:
        text = {**config, **config.get("text_config", {})}  # vision-language checkpoints: the language model
        s = DecoderShape.of(text)
        d, q, kv = s.hidden, s.heads * s.head_dim, s.kv_heads * s.head_dim
        model_type = text.get("model_type", "")
        qk_norm = model_type.startswith(("qwen3", "gemma3"))
        norms = 4 if model_type.startswith("gemma") else 2
        bias = q + 2 * kv if model_type == "qwen2" else (q + 2 * kv + d if text.get("attention_bias") else 0)
        layer = s.layer_matmul_params + norms * d + bias + (2 * s.head_dim if qk_norm else 0)
        params = s.head_params * (1 if s.tied else 2) + s.layers * layer + d
        return cls(s, params, qk_norm, source)


def hub_shape_file(name: str) -> Path:
    """assets/shapes/<name after the slash, lower case>.json: Qwen/Qwen2.5-1.5B-Instruct -> qwen2.5-1.5b-instruct."""
    return resolve_path(SHAPES_DIR) / f"{name.rsplit('/', 1)[-1].lower()}.json"


def model_arch(name: str) -> Arch | None:
    """The shape of model setting `name`, from config.json only: a local folder, the shape files of the anchors'
    hub ids, or the Hugging Face cache (no download). None when none of them has it."""
    candidates = [resolve_path(name) / "config.json", hub_shape_file(name)]
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "config.json") if name.count("/") == 1 else None
        if isinstance(cached, str):
            candidates.append(Path(cached))
    except Exception:  # noqa: BLE001 - an invalid repo id or an unusable cache: no cached shape
        pass
    for path in candidates:
        if path.is_file():
            return Arch.of(json.loads(path.read_text()), str(path))
    return None


# ---------------------------------------------------------------- the step's shape


@dataclass(frozen=True)
class Step:
    num_sequences: int  # prompts x samples of a step
    prompt_tokens: int  # the longest prompt (a bound)
    response_tokens: int  # rollout.max_new_tokens (a bound)
    num_eval_sequences: int = 0  # evaluation: held-out prompts x samples

    @property
    def seq_len(self) -> int:
        return self.prompt_tokens + self.response_tokens

    @property
    def tokens(self) -> int:
        return self.num_sequences * self.seq_len

    def micro_batch(self, budget: int, num_sequences: int | None = None) -> tuple[int, int, bool]:
        """(tokens, response tokens, packs several sequences) of the largest micro-batch under `budget`
        (0: the whole batch; a sequence longer than the budget gets one of its own; RolloutBatch.micro_batches)."""
        total = (self.num_sequences if num_sequences is None else num_sequences) * self.seq_len
        m = total if budget <= 0 else min(total, max(budget, self.seq_len))
        return m, math.ceil(m * self.response_tokens / self.seq_len), m > self.seq_len


def step_of(cfg: Config, prompt_tokens: int | None = None) -> Step:
    """The step the plan bounds: the bench's prompt length, else `prompt_tokens` (preflight passes the prompt set's
    longest), else data.max_prompt_tokens."""
    if prompt_tokens is None:
        prompt_tokens = cfg.bench.prompt_tokens if cfg.bench.enabled else cfg.data.max_prompt_tokens
    samples = cfg.rollout.num_samples
    return Step(cfg.train.prompts_per_step * samples, prompt_tokens, cfg.rollout.max_new_tokens,
                cfg.data.num_eval_prompts * samples)


# ---------------------------------------------------------------- terms


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
                   attn: str, what: str, kv_setting: str, phase: str = "step") -> list[Term]:
    """`generate` over `num_seqs` left-padded sequences: the KV cache, the prefill's forward over the whole
    padded batch, per-step [B, V] fp32 logits; on the CPU transformers' `generate(output_scores=True)` keeps
    every step's [B, V] fp32 scores and `compute_transition_scores` two more copies (the GPU decode loop
    keeps none)."""
    s = a.shape
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


# ---------------------------------------------------------------- the plan


@dataclass(frozen=True)
class DeviceUse:
    name: str  # "GPU 0", "RAM"
    roles: tuple[str, ...]
    need_bytes: int
    have_bytes: int
    returned: bool = True  # phases return their memory: the need is every persistent term plus the largest phase

    @property
    def fits(self) -> bool:
        return self.need_bytes <= self.have_bytes


@dataclass(frozen=True)
class MemoryPlan:
    device: Device
    mode: str
    actors: dict[str, ActorPlan] = field(default_factory=dict)
    uses: tuple[DeviceUse, ...] = ()
    not_planned: str = ""  # why there is no plan ("not planned: no shape for ...")
    advice: dict[str, str] = field(default_factory=dict)  # device name -> the one-line refusal

    @property
    def fits(self) -> bool:
        return all(u.fits for u in self.uses)

    @property
    def problems(self) -> list[str]:
        return [self.advice[u.name] for u in self.uses if not u.fits]

    def format(self, verbose: bool = False) -> str:
        """One line per device (and, verbose, one per actor with its terms), sizes in GiB."""
        if self.not_planned:
            return f"memory plan: {self.not_planned}"
        lines = []
        for u in self.uses:
            if u.returned and len(u.roles) > 1:  # held by all + the largest phase, which runs alone
                held = ", ".join(f"{r} {self.actors[r].persistent_bytes / GIB:.1f}" for r in u.roles)
                top = max(u.roles, key=lambda r: self.actors[r].step_bytes)
                parts = f"held ({held}) + largest phase ({top} {self.actors[top].step_bytes / GIB:.1f})"
            else:
                parts = " + ".join(f"{r} {self.actors[r].peak_bytes / GIB:.1f}" for r in u.roles)
            lines.append(f"memory plan ({self.mode}): {u.name} ({self.device.name}, {u.have_bytes / GIB:.1f} GiB) "
                         f"needs {u.need_bytes / GIB:.1f} GiB ({u.need_bytes / u.have_bytes:.0%}): {parts}")
        if verbose:
            for role, a in self.actors.items():
                terms = ", ".join(f"{t.name} {t.bytes / GIB:.2f}" + ("" if t.persistent or t.phase == "step"
                                                                   else f" [{t.phase}]") for t in a.terms if t.bytes)
                lines.append(f"  {role}: peak {a.peak_bytes / GIB:.2f} GiB ({terms})")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"device": vars(self.device), "mode": self.mode, "fits": self.fits, "not_planned": self.not_planned,
                "uses": [{**vars(u), "fits": u.fits} for u in self.uses],
                "actors": {r: {"peak_bytes": a.peak_bytes, "persistent_bytes": a.persistent_bytes,
                               "step_bytes": a.step_bytes, "terms": a.breakdown()} for r, a in self.actors.items()}}


def actor_plans(cfg: Config, student: Arch, teacher: Arch, step: Step, device: Device) -> dict[str, ActorPlan]:
    """Each actor's terms (one replica of each, with its share of the sequences)."""
    mode, b = cfg.run.mode, DTYPE_BYTES[cfg.model.dtype]
    on_gpu = device.kind == "cuda"
    s, t = student.shape, teacher.shape
    attn = cfg.model.attn_implementation or "sdpa"
    framework = Term("CUDA context" if on_gpu else "process baseline",
                     CUDA_CONTEXT_BYTES if on_gpu else CPU_PROCESS_BYTES, "fixed", True)
    full_vocab = cfg.loss.kind != "sampled_rkl"
    responses = step.num_sequences * step.response_tokens
    teacher_responses = math.ceil(responses / cfg.run.teacher_replicas)
    state_bytes = t.hidden * b if full_vocab else 4  # per response token: hidden states, or one fp32 log-prob
    valid_vocab = min(s.vocab, t.vocab)
    from opd.kernels.chunked import default_chunk_size

    chunk = cfg.loss.chunk_size or default_chunk_size(valid_vocab, s.hidden, "cuda" if on_gpu else "cpu")
    lc = cfg.learner
    compute = getattr(lc, "compute_dtype", "float32")
    m, n, packed = step.micro_batch(lc.micro_batch_tokens)
    blocks = LOSS_BLOCKS * min(chunk, n) * valid_vocab * 4  # a chunk is at most the micro-batch's response tokens

    # learner: fp32 master weights, grads and AdamW's two moments (run.learner_replicas=N: each replica its 1/N
    # shard, FSDP2); the loss over one micro-batch at a time
    k = cfg.run.learner_replicas
    p4 = math.ceil(student.params * 4 / k)
    learner = [Term("weights", p4, "model", True), Term("grads", p4, "model", True),
               Term("optimizer", 2 * p4, "model", True), framework]
    if mode != "cpu" or k > 1:  # the flat copy the engines read (model.dtype; cpu mode fp32), whole on every replica
        learner.append(Term("serving buffer", student.params * (b if mode != "cpu" else 4), "model", True))
    if k > 1:  # FSDP's gathered units while they compute: the root (embeddings, output head, kept gathered through
        # the step) and two decoder layers (one prefetched), their parameters and unsharded gradients
        layer = (student.params - s.head_params * (1 if s.tied else 2) - s.hidden) // max(1, s.layers)
        gathered = student.params - s.layers * layer + 2 * layer
        gathered_bytes = 2 if on_gpu and compute == "bfloat16" else 4
        learner.append(Term("gathered by FSDP", gathered * (gathered_bytes + 4), "model"))
    learner.append(Term("teacher head", t.vocab * t.hidden * 4, "vocabulary", True))  # OutputHead, fp32
    if mode != "colocated":  # one micro-batch's part at a time; colocated maps the teacher's tensor (no copy)
        learner.append(Term("received teacher states", n * state_bytes, "micro-batch tokens",
                            setting="learner.micro_batch_tokens"))
    activations, working, forward_casts = learner_activation_terms(
        student, m, n, packed, compute=compute, checkpointing=lc.gradient_checkpointing, attn=attn)
    learner += activations
    # The loss's forward computes d loss / d w_s ([V, d] fp32, saved) beside a few [chunk, V] fp32 blocks per chunk;
    # its backward returns a scaled copy of that gradient; the peak is the larger of the two. With bf16 compute the
    # forward's GEMM operands are copies of both output weights (bf16 on a GPU; on the CPU bf16-rounded and widened
    # back to fp32), freed when it returns; the fp32 weights are used as they are otherwise. Per response token:
    # d loss / d h_s and its scaled copy.
    head = s.vocab * s.hidden * 4
    copies = (valid_vocab * (s.hidden + t.hidden) * (2 if on_gpu else 4)
              if compute == "bfloat16" and full_vocab else 0)
    loss_peak = max(blocks + head, 2 * head)
    learner.append(Term("loss blocks", loss_peak + n * 2 * s.hidden * 4,
                        "vocabulary x loss.chunk_size", setting="loss.chunk_size"))
    if copies:  # what they add to the loss's peak
        learner.append(Term("output weight copies", max(0, blocks + head + copies - loss_peak), "vocabulary"))
        loss_peak = max(loss_peak, blocks + head + copies)
    # The layers' backward comes after the loss's: its working set overlaps one [V, d] gradient (a tied head's share
    # waits there for the embedding's), not the loss's peak; a checkpointed forward's autocast copies are gone
    # before the loss runs. Only what exceeds the loss's peak adds (measured: docs/memory_plan.md).
    knob = "learner.micro_batch_tokens" + ("" if lc.gradient_checkpointing else " / learner.gradient_checkpointing")
    learner.append(Term("backward working set", max(0, head + working - loss_peak, forward_casts - loss_peak),
                        "micro-batch tokens", setting=knob))
    if m >= step.tokens:
        # One micro-batch: the step drops the previous step's gradients first (zero_grad(set_to_none=True)) and
        # backward rebuilds them as the activations are freed, so they are not there at the activations' peak
        # (measured: docs/memory_plan.md). With several micro-batches the first one's gradients are.
        learner.append(Term("grads not yet rebuilt", -p4, "model"))  # (this replica's shard of them)
    if not on_gpu:  # the CPU's single-tensor AdamW: a temporary the size of the largest parameter, after backward
        learner.append(Term("optimizer step", 2 * s.vocab * s.hidden * 4, "model", phase="optimizer"))

    # teacher: weights in model.dtype; one packed row of teacher.micro_batch_tokens at a time, no activations kept
    tm, tn, tpacked = step.micro_batch(cfg.teacher.micro_batch_tokens,
                                       math.ceil(step.num_sequences / cfg.run.teacher_replicas))
    teacher_terms = [Term("weights", teacher.params * b, "model", True), framework]
    if mode == "cpu":  # hidden states through the object store (opd/modes.py hidden_transport)
        # streamed: a row's states until its micro-batches' parts are yielded, and the part being yielded
        teacher_terms.append(Term("states in flight", (tn + n) * state_bytes, "micro-batch tokens",
                                  setting="teacher.micro_batch_tokens / learner.micro_batch_tokens"))
    else:  # ipc: the outbox keeps the last two batches' parts; collective: the step's parts wait for the send
        held = 2 if mode == "colocated" else 1
        teacher_terms.append(Term("returned states", held * teacher_responses * state_bytes, "step response tokens",
                                  held == 2, setting="train.prompts_per_step"))
    forward = forward_transient_bytes(teacher, tm, tpacked, b, attn)
    if not full_vocab:  # chunked_token_logprobs widens the teacher's output weight to fp32
        forward += (t.vocab * t.hidden * 4 if b != 4 else 0) + blocks
    teacher_terms.append(Term("forward transients", forward, "teacher micro-batch tokens",
                              setting="teacher.micro_batch_tokens"))
    # evaluation: the teacher's greedy answers to the held-out prompts, with its own KV cache
    teacher_terms += generate_terms(teacher, math.ceil(cfg.data.num_eval_prompts / cfg.run.teacher_replicas),
                                    step.prompt_tokens, step.response_tokens, b, on_gpu=on_gpu, attn=attn,
                                    what="eval", kv_setting="data.num_eval_prompts", phase="eval")

    # rollout: the student (cpu: views of the learner's fp32 buffer; colocated: of its serving buffer, both counted
    # in the learner), its KV cache and prefill while it generates
    r = cfg.rollout
    rollout = [framework]
    if r.engine == "sglang":  # weights and KV cache inside mem_fraction of the GPU (what is free at its start)
        rollout.append(Term("sglang reservation", int(r.mem_fraction * device.total_bytes), "GPU memory", True,
                            setting="rollout.mem_fraction"))
    else:
        if mode == "split":
            rollout.append(Term("weights", student.params * b, "model", True))
        seqs = max(step.num_sequences, step.num_eval_sequences)
        rollout += generate_terms(student, math.ceil(seqs / cfg.run.rollout_replicas), step.prompt_tokens,
                                  step.response_tokens, 4 if mode == "cpu" else b, on_gpu=on_gpu, attn=attn,
                                  what="generate", kv_setting="rollout.max_new_tokens / train.prompts_per_step")
    return {"rollout": ActorPlan("rollout", tuple(rollout)), "teacher": ActorPlan("teacher", tuple(teacher_terms)),
            "learner": ActorPlan("learner", tuple(learner))}


def plan(cfg: Config, device: Device, *, prompt_tokens: int | None = None) -> MemoryPlan:
    """Each actor's peak for `cfg` and, per device of the mode's placement, their sum against its memory."""
    mode = cfg.run.mode
    archs = {side: model_arch(getattr(cfg.model, side)) for side in ("student", "teacher")}
    missing = [f"model.{side}={getattr(cfg.model, side)}" for side, a in archs.items() if a is None]
    if missing:
        return MemoryPlan(device, mode, not_planned=f"not planned: no shape for {', '.join(missing)} (no local "
                                                    f"config.json, no {SHAPES_DIR}/ file, not in the HF cache)")
    actors = actor_plans(cfg, archs["student"], archs["teacher"], step_of(cfg, prompt_tokens), device)
    rep = {"rollout": cfg.run.rollout_replicas, "teacher": cfg.run.teacher_replicas,
           "learner": cfg.run.learner_replicas}

    def together(roles: tuple[str, ...], returned: bool, replicas: bool = True) -> int:
        """The need of `roles` sharing one device: every persistent term, plus the largest phase when each phase
        returns its memory (`returned`), else every actor's whole peak."""
        k = {r: rep[r] if replicas else 1 for r in roles}
        persistent = sum(k[r] * actors[r].persistent_bytes for r in roles)
        if returned:
            return persistent + max(actors[r].step_bytes for r in roles)
        return persistent + sum(k[r] * actors[r].step_bytes for r in roles)

    everyone = ("rollout", "teacher", "learner")
    if device.kind != "cuda" or not uses_gpus(cfg):
        uses = (DeviceUse("RAM", everyone, together(everyone, returned=True), device.total_bytes),)
    elif mode == "colocated" and cfg.run.gpus > 1:  # one of each on every GPU: the same need on each
        uses = (DeviceUse(f"each of GPUs 0-{cfg.run.gpus - 1}", everyone,
                          together(everyone, returned=True, replicas=False), device.total_bytes),)
    elif mode == "colocated":
        uses = (DeviceUse("GPU 0", everyone, together(everyone, returned=True), device.total_bytes),)
    else:  # split: the learner alone on GPU 0; rollout replica i and teacher replica i share GPU 1 + i
        uses = (DeviceUse("GPU 0", ("learner",), actors["learner"].peak_bytes, device.total_bytes, False),
                DeviceUse("GPU 1", ("rollout", "teacher"), together(("rollout", "teacher"), False, replicas=False),
                          device.total_bytes, False))
    return MemoryPlan(device, mode, actors, uses, advice={u.name: _advice(cfg, u, actors, device) for u in uses})


def _advice(cfg: Config, use: DeviceUse, actors: dict[str, ActorPlan], device: Device) -> str:
    """One line: the device, the estimate against its memory, the actor to blame and the setting to change. When
    the persistent terms alone do not fit, no token budget helps: the actor holding the most of them is named."""
    peaks = ", ".join(f"{r} {actors[r].peak_bytes / GIB:.1f}" for r in use.roles)
    head = f"memory plan: {{}} does not fit on {use.name} ({device.name}, {use.have_bytes / GIB:.1f} GiB): estimate " \
           f"{use.need_bytes / GIB:.1f} GiB ({peaks}), "
    persistent = sum(actors[r].persistent_bytes for r in use.roles)
    candidates = [(t.bytes, role, t) for role in use.roles for t in actors[role].terms if t.setting]
    if persistent > use.have_bytes or not candidates:
        held = max(((t.bytes, role, t) for role in use.roles for t in actors[role].terms if t.persistent),
                   key=lambda c: c[0])
        if held[2].setting:  # sglang's reservation: a fraction of the GPU
            return head.format(held[1]) + f"its {held[2].name} {held[0] / GIB:.1f} GiB: {_fix(cfg, held[2])}"
        role = max(use.roles, key=lambda r: actors[r].persistent_bytes)
        fix = ("use --mode split (the learner gets a GPU of its own)" if cfg.run.mode == "colocated"
               else "use a device with more memory or a smaller model")
        return head.format(role) + (f"weights, gradients and optimizer state alone {persistent / GIB:.1f} GiB: "
                                    f"{fix}")
    size, role, term = max(candidates, key=lambda c: c[0])
    return head.format(role) + f"its largest part {term.name} {size / GIB:.1f} GiB: {_fix(cfg, term)}"


def _fix(cfg: Config, term: Term) -> str:
    lc, tc = cfg.learner, cfg.teacher
    if term.setting.startswith("learner.micro_batch_tokens"):
        now = f"lower learner.micro_batch_tokens (now {lc.micro_batch_tokens or '0, the whole batch'})"
        return now + ("" if lc.gradient_checkpointing else " or turn on learner.gradient_checkpointing")
    if term.setting == "teacher.micro_batch_tokens":
        return f"lower teacher.micro_batch_tokens (now {tc.micro_batch_tokens or '0, the whole batch'})"
    if term.setting == "rollout.mem_fraction":
        return f"lower rollout.mem_fraction (now {cfg.rollout.mem_fraction})"
    if term.setting.startswith("model."):
        return f"set {term.setting}"
    split = " or use --mode split" if cfg.run.mode == "colocated" else ""
    return f"lower {term.setting}{split}"


def check(cfg: Config, device: Device | None = None, *, prompt_tokens: int | None = None,
          warn_only: bool | None = None) -> MemoryPlan:
    """The plan for `cfg` on `device` (default: this machine's); raises ConfigError with one line when a GPU cannot
    hold it. On the CPU (or `warn_only`) a shortfall is returned, not raised: the caller warns."""
    device = detect(cfg) if device is None else device
    if device is None:
        return MemoryPlan(Device.cpu(0), cfg.run.mode, not_planned="not checked: the GPUs are a Ray cluster's")
    result = plan(cfg, device, prompt_tokens=prompt_tokens)
    warn_only = device.kind != "cuda" if warn_only is None else warn_only
    if result.problems and not warn_only:
        raise ConfigError(result.problems[0])
    return result


def main(argv: list[str] | None = None) -> int:
    """`python -m opd.memory --preset qwen25_1p5b_from_7b --gpu-gib 80 [--set a.b=v ...]`: print a plan."""
    import argparse

    from opd.config import override, preset

    ap = argparse.ArgumentParser(description="Print the memory plan of a config on a device (no model is loaded).")
    ap.add_argument("--preset", default="tiny_cpu")
    ap.add_argument("--set", action="append", default=[], dest="sets", metavar="SECTION.FIELD=VALUE")
    ap.add_argument("--gpu-gib", type=float, default=0.0, help="plan for GPUs of this memory (0: this machine)")
    ap.add_argument("--gpu-name", default="GPU")
    ap.add_argument("--prompt-tokens", type=int, default=None,
                    help="the longest prompt (default: data.max_prompt_tokens)")
    args = ap.parse_args(argv)
    try:
        cfg = preset(args.preset)
        for s in args.sets:
            cfg = override(cfg, s)
        device = (Device.gpu(int(args.gpu_gib * GIB), args.gpu_name, 2) if args.gpu_gib
                                  else detect(cfg) or Device.cpu())
        result = plan(cfg, device, prompt_tokens=args.prompt_tokens)
    except ConfigError as e:
        print(f"error: {e}")
        return 2
    print(result.format(verbose=True))
    for problem in result.problems:
        print(f"{'error' if device.kind == 'cuda' else 'warning'}: {problem}")
    return 1 if result.problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
