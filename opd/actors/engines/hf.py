"""The hf rollout engine: a transformers model and the engine's own KV-cached decode loop (or transformers'
`generate`, the reference: rollout.sampler=generate), on CPU or one GPU.

It follows the engine protocol every engine implements: `generate`, `load_weights`, `weight_version`,
`release_memory`, `resume_memory`.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math

import torch
import torch.fx.experimental._config as fx_config
from transformers import AttentionInterface, AutoModelForCausalLM, DynamicCache, GenerationConfig, PreTrainedModel
from transformers.cache_utils import DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from opd.actors.engines import cpu_matmul
from opd.actors.engines.cpu_matmul import cpu_project, few_row_projections, few_rows_linear, fixed_path, head_rows
from opd.batch import RolloutBatch
from opd.transport.weights import (ServingBuffer, WeightUpdate, attach_parameters, attach_serving, bind_to_buffer,
                               broadcast_buckets)


def resolve_sampler(name: str, device: torch.device) -> str | None:
    """None: transformers' `generate` (rollout.sampler=generate, the reference); "torch" / "flashinfer": this
    engine's own decode loop, sampling with torch (CPU or GPU) or with FlashInfer's kernels (auto: FlashInfer on a
    GPU where it imports and has its kernels, opd/samplers.py; else torch, with a warning on a GPU). An explicit
    flashinfer that cannot run here is refused now, not at the first sampled token."""
    if name == "generate":
        return None
    if name == "torch" or (name == "auto" and device.type != "cuda"):
        return "torch"
    if device.type != "cuda":
        raise ValueError(f"rollout.sampler=flashinfer samples on a GPU and this engine runs on {device}: set "
                         f"rollout.sampler=torch or auto")
    from opd.samplers import flashinfer_problem

    if (problem := flashinfer_problem()) is None:
        return "flashinfer"
    why, fix = problem
    if name == "flashinfer":
        raise ValueError(f"rollout.sampler=flashinfer cannot run here: {why}: {fix}")
    import warnings

    warnings.warn(f"rollout.sampler=auto samples with torch, not FlashInfer: {why}: {fix}", stacklevel=2)
    return "torch"


class HFEngine:
    def __init__(self, model: PreTrainedModel, *, eos_id: int, pad_id: int, sampler: str | None = None,
                 valid_vocab: int | None = None, compile: bool = False, max_batch_tokens: int = 0):
        self.model = model.eval()
        self.max_batch_tokens = max_batch_tokens  # KV-cache tokens of one decoding wave (0: the whole batch)
        self.eos_id, self.pad_id = eos_id, pad_id
        # the decode loop samples from the first `valid_vocab` rows only (a head padded past the tokenizer: the
        # teacher, whose samples the student trains on with rollout.student_fraction < 1)
        self.valid_vocab = valid_vocab
        self.sampler = sampler  # None: transformers' generate; "torch" | "flashinfer": the decode loop below
        # the CPU decode loop's projections (see `cpu_project`), by the path timed fastest for each shape on this
        # machine (`_tune_cpu_paths`: `path_key` -> path; the head: rows -> (prefill path, decode path),
        # "reduction" the compiled `head_rows`)
        self._paths: dict[tuple[int, int, int, bool], str] = {}
        self._head_paths: dict[int, tuple[str, str]] = {}
        self._tuned_rows: set[int] = set()
        self._few_rows = {m: functools.partial(few_rows_linear, m, self._paths) for m in self.model.modules()
                          if type(m) is torch.nn.Linear}
        self._own_head: bool | None = None  # whether `w @ h.T` is the model's own head (checked at first use)
        # rollout.compile: the decode steps' decoder, and the head for a few rows, through torch.compile (CPU)
        self._step = torch.compile(_decoder_step, dynamic=True) if compile else None
        self._head = torch.compile(head_rows, dynamic=False) if compile else None
        # transformers >= 5.2x names the KV cache `cache` (`past_key_values` before, deprecated since)
        self._cache_kw = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        self._version = -1  # no weights published yet
        self._buffer: ServingBuffer | None = None  # split mode: the buffer the broadcast lands in

    @classmethod
    def from_pretrained(cls, path: str, *, eos_id: int, pad_id: int, device: str = "cpu") -> "HFEngine":
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
        return cls(model, eos_id=eos_id, pad_id=pad_id)

    # ------------------------------------------------------------ protocol

    def weight_version(self) -> int:
        return self._version

    def load_weights(self, update: WeightUpdate) -> int:
        if update.shared is not None:
            attach_parameters(self.model, update.shared)  # once: from now on the weights are the learner's
        if update.serving is not None:
            attach_serving(self.model, update.serving)  # once: the learner refreshes the buffer in place
        if update.broadcast is not None:  # split: receive into a buffer whose views are the parameters
            spec = update.broadcast
            if self._buffer is None:
                self._buffer = ServingBuffer(spec.layout, spec.dtype, device=self.model.device)
                bind_to_buffer(self.model, self._buffer)
            broadcast_buckets(self._buffer, spec.buckets, spec.group)
        self._version = update.version
        return self._version

    def release_memory(self) -> None:  # nothing to release on CPU
        pass

    def resume_memory(self) -> None:
        pass

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], *, num_samples: int = 1, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 0, max_new_tokens: int, greedy: bool = False,
                 seed: int | None = None, ignore_eos: bool = False) -> RolloutBatch:
        """Sample `num_samples` responses per prompt (token ids in, token ids out). `ignore_eos`: every
        response has exactly `max_new_tokens` tokens (end-of-sequence is masked until then, as `min_new_tokens`
        does; benchmarks).

        Log-probs are those of the distribution actually sampled from (after temperature, top-k, top-p).

        With `max_batch_tokens` (rollout.max_batch_tokens) the rows are decoded in waves of at most that many
        KV-cache tokens (rows x (the longest prompt + max_new_tokens)), one after another from one seeded
        stream: the KV cache, the prefill and the logits follow the budget, not the batch.
        """
        flat = [p for p in prompts for _ in range(num_samples)]
        if seed is not None:
            torch.manual_seed(seed)  # generate samples from the global generator; the waves share its stream
        width = max(len(p) for p in flat)
        rows = len(flat) if self.max_batch_tokens <= 0 else max(1, self.max_batch_tokens // (width + max_new_tokens))
        responses, response_logprobs, reasons = [], [], []
        for start in range(0, len(flat), rows):
            wave = self._generate_rows(flat[start:start + rows], temperature=temperature, top_p=top_p, top_k=top_k,
                                       max_new_tokens=max_new_tokens, greedy=greedy, ignore_eos=ignore_eos)
            for out, part in zip((responses, response_logprobs, reasons), wave, strict=True):
                out += part
        return RolloutBatch.from_lists(flat, responses, response_logprobs,
                                       prompt_index=torch.arange(len(prompts)).repeat_interleave(num_samples),
                                       finish_reasons=reasons, policy_version=self._version)

    def _generate_rows(self, flat: list[list[int]], *, temperature: float, top_p: float, top_k: int,
                       max_new_tokens: int, greedy: bool, ignore_eos: bool):
        """(responses, log-probs, finish reasons) of one wave of rows, each decoded to its end-of-sequence."""
        device = self.model.device
        width = max(len(p) for p in flat)
        # Left padding: every row's last prompt token sits in the same column, as generate expects.
        input_ids = torch.full((len(flat), width), self.pad_id, dtype=torch.int64)
        attention_mask = torch.zeros_like(input_ids)
        for i, p in enumerate(flat):
            input_ids[i, width - len(p):] = torch.tensor(p)
            attention_mask[i, width - len(p):] = 1
        sampling = {} if greedy else dict(temperature=temperature, top_p=top_p, top_k=top_k)
        config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=not greedy, eos_token_id=self.eos_id,
                                  pad_token_id=self.pad_id, return_dict_in_generate=True, output_scores=True,
                                  min_new_tokens=max_new_tokens if ignore_eos else None, **sampling)
        if self.sampler is None:
            out = self.model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                      generation_config=config)
            new_ids = out.sequences[:, width:].cpu()
            # scores are the processed logits each token was sampled from; normalise them to log-probs.
            logprobs = self.model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True).cpu()
        else:
            new_ids, logprobs = self._decode(input_ids.to(device), attention_mask.to(device), greedy=greedy,
                                             max_new_tokens=max_new_tokens, ignore_eos=ignore_eos, **sampling)

        responses, response_logprobs, reasons = [], [], []
        for ids, lps in zip(new_ids.tolist(), logprobs, strict=True):
            end = ids.index(self.eos_id) + 1 if self.eos_id in ids else len(ids)
            responses.append(ids[:end])
            response_logprobs.append(lps[:end])
            reasons.append("stop" if ids[end - 1] == self.eos_id else "length")
        return responses, response_logprobs, reasons

    def _next_logits(self, input_ids, attention_mask, position_ids, cache, *, prefill: bool):
        """fp32 logits `[B, V]` of the last position (the cache is updated in place). The last position only: the
        prefill would otherwise make `[B, prompt, V]` logits it never samples from. The output projection is the
        engine's own: `w @ h.T` (on the CPU, MKL's path for `h @ w.T` with a few rows is ~4x slower at V = 32k:
        8.6 vs 2.0 ms, one thread, most of a decode step; on another 1.2 vs 2.1: `_tune_cpu_paths`), oneDNN's for
        long rows on the CPU (`cpu_project`), or rollout.compile's `head_rows`. The first prefill checks the eager
        one against the model's own head; a model that scales or caps its logits keeps its own forward."""
        key = self._cache_kw
        if self._own_head is False:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             use_cache=True, logits_to_keep=1, **{key: cache})
            return out.logits[:, -1].float()
        step = _decoder_step if prefill or self._step is None else self._step  # the prefill's width varies
        h = step(self.model.get_decoder(), key, input_ids, attention_mask, position_ids, cache)
        w = self.model.get_output_embeddings().weight
        if w.device.type != "cpu":
            logits = (w @ h.T).T.float()
        else:
            tuned = self._head_paths.get(h.shape[0])  # (the prefill's path, the decode steps')
            path = tuned and tuned[0 if prefill else 1]
            if path == "reduction":
                logits = self._head(w, h).float()
            else:
                logits = cpu_project(h, w, path=path or fixed_path(*h.shape, h.dtype, head=True)).float()
        if self._own_head is None and prefill:
            theirs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                use_cache=False, logits_to_keep=1).logits[:, -1].float()
            scale = float(theirs.abs().max())
            if not math.isfinite(scale):  # non-finite logits (a broken model) decide nothing: ask again next time
                return theirs
            self._own_head = torch.allclose(logits, theirs, rtol=1e-3, atol=1e-4 * scale)
            if not self._own_head:
                return theirs  # the same cache: only the head differs
        return logits

    def _decode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, max_new_tokens: int,
                greedy: bool, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                ignore_eos: bool = False):
        """A KV-cached decode loop that samples with torch or FlashInfer (GPU). Returns `[B, max_new_tokens]`
        token ids (pad after end-of-sequence) and the log-prob of each under the distribution sampled from
        (after temperature, top-k and top-p, renormalised), as `generate` + `compute_transition_scores` do; no
        `[B, V]` scores are kept between steps. Finished rows keep decoding padding (masked out of the result)."""
        rows = input_ids.shape[0]
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        tokens, logprobs = [], []
        done = torch.zeros(rows, dtype=torch.bool, device=input_ids.device)
        padded = not bool(attention_mask.all())  # no padding: no mask to build at every step
        step_ids, step_pos = input_ids, positions
        cache = preallocated_cache(self.model.config, input_ids.shape[1] + max_new_tokens)
        if padded:  # the mask for every step at once; step s attends to the first width + s positions
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(rows, max_new_tokens)], dim=1)
        width = input_ids.shape[1]
        with contextlib.ExitStack() as scope:
            if self.model.device.type == "cpu":
                self._tune_cpu_paths(rows)
                scope.enter_context(few_row_projections(self._few_rows))
            if self._step is not None and self.model.device.type == "cpu":
                scope.enter_context(attention_implementation(self.model, "sdpa", GQA_SDPA))
            if self._step is not None:
                # no duck sizing: a context length that equals another size at the first decode step (a 64-token
                # prompt and head_dim 64) would share its symbol, and the next step recompile
                scope.enter_context(fx_config.patch(use_duck_shape=False))
            for step in range(max_new_tokens):
                if step == 2 and self._step is not None:
                    # the compiled graphs the first decode step chose serve the rest of this loop: only the context
                    # length changes (a dynamic dimension), so their guards need not run again (~0.3 ms a step)
                    scope.enter_context(torch.compiler.set_stance("default", skip_guard_eval_unsafe=True))
                logits = self._next_logits(step_ids, attention_mask[:, :width + step] if padded else None, step_pos,
                                           cache, prefill=step == 0)
                if self.valid_vocab is not None and self.valid_vocab < logits.shape[1]:
                    logits[:, self.valid_vocab:] = float("-inf")
                if ignore_eos:  # as generate's min_new_tokens: end-of-sequence cannot be sampled
                    logits[:, self.eos_id] = float("-inf")
                if greedy:
                    token = logits.argmax(-1)
                    logprob = torch.log_softmax(logits, -1).gather(-1, token[:, None])[:, 0]
                else:
                    if temperature != 1.0:
                        logits = logits / temperature
                    probs = filter_probs(torch.softmax(logits, -1), top_k=top_k, top_p=top_p)
                    token = sample_from(probs, self.sampler)
                    logprob = probs.gather(-1, token[:, None])[:, 0].log()
                token = torch.where(done, self.pad_id, token)
                tokens.append(token)
                logprobs.append(torch.where(done, 0.0, logprob))
                done |= token == self.eos_id
                if bool(done.all()):
                    break
                step_ids, step_pos = token[:, None], step_pos[:, -1:] + 1
        pad = max_new_tokens - len(tokens)
        ids = torch.nn.functional.pad(torch.stack(tokens, 1), (0, pad), value=self.pad_id)
        return ids.cpu(), torch.nn.functional.pad(torch.stack(logprobs, 1), (0, pad)).cpu()

    def _tune_cpu_paths(self, rows: int) -> None:
        """`cpu_matmul.tune` once per row count; the paths it picks serve this engine's life."""
        if rows in self._tuned_rows:
            return
        self._tuned_rows.add(rows)
        head = self.model.get_output_embeddings()
        paths, head_paths = cpu_matmul.tune(rows, [m for m in self._few_rows if m is not head], head.weight,
                                            self._head)
        self._paths.update(paths)
        if head_paths is not None:
            self._head_paths[rows] = head_paths


def gqa_sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers' "sdpa" attention, except that a single query position attends to grouped KV heads where they
    are (SDPA's `enable_gqa`). Under torch.compile transformers repeats the cache's keys and values for every query
    head instead (its copy-free path for one query is eager-only): a copy of the whole cache per layer and decode
    step, 0.6 of 3.2 ms a token for the side-by-side student at 1k tokens. rollout.compile's loop on the CPU."""
    if (query.shape[2] != 1 or getattr(module, "num_key_value_groups", 1) == 1 or module.training
            or kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scaling,
                                                           enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


GQA_SDPA = "opd_gqa_sdpa"
AttentionInterface.register(GQA_SDPA, gqa_sdpa_attention)
AttentionMaskInterface.register(GQA_SDPA, sdpa_mask)  # sdpa's masks


@contextlib.contextmanager
def attention_implementation(model: PreTrainedModel, replaces: str, name: str):
    """For the duration, `model` attends by the registered `name` where its configuration says `replaces`."""
    before = model.config._attn_implementation
    if before != replaces:
        yield
        return
    model.config._attn_implementation = name
    try:
        yield
    finally:
        model.config._attn_implementation = before


def _decoder_step(decoder, cache_kw: str, input_ids, attention_mask, position_ids, cache) -> torch.Tensor:
    """The last position's hidden state `[B, d]`, the cache updated (rollout.compile compiles this for the decode
    steps: dynamic shapes, so one graph serves every context length and batch size)."""
    out = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
                  **{cache_kw: cache})
    return out.last_hidden_state[:, -1]


class PreallocatedLayer(DynamicLayer):
    """A full-attention layer's KV cache in buffers allocated once for `max_len` positions: each step writes its
    keys and values in place and attention reads the filled prefix (views). transformers' DynamicLayer
    concatenates, copying the whole cache at every decode step (~0.3 ms a step at 1k tokens for the side-by-side
    student); its StaticLayer attends over all `max_len` positions under a mask, and expands grouped KV heads
    over them. Made for one decode loop: no crop, reorder or batch selection."""

    def __init__(self, max_len: int):
        super().__init__()
        self.max_len, self.filled = max_len, 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        rows, heads, _, dim = key_states.shape
        self._keys = key_states.new_empty(rows, heads, self.max_len, dim)
        self._values = value_states.new_empty(rows, value_states.shape[1], self.max_len, value_states.shape[-1])

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, end = self.filled, self.filled + key_states.shape[-2]
        if end > self.max_len:
            raise ValueError(f"the decode loop's KV cache holds {self.max_len} positions; {end} were written")
        self._keys[:, :, start:end].copy_(key_states)
        self._values[:, :, start:end].copy_(value_states)
        self.filled = end
        self.keys, self.values = self._keys[:, :, :end], self._values[:, :, :end]
        return self.keys, self.values


def preallocated_cache(config, max_len: int) -> DynamicCache:
    """transformers' DynamicCache for `config`, its full-attention layers `PreallocatedLayer`s of `max_len`
    positions (sliding-window and other layer kinds keep transformers' own)."""
    cache = DynamicCache(config=config)
    cache.layers = [PreallocatedLayer(max_len) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def filter_probs(probs: torch.Tensor, *, top_k: int, top_p: float) -> torch.Tensor:
    """Top-k then top-p (nucleus) truncation of `[B, V]` probabilities, renormalised (transformers' order)."""
    if top_k > 0:
        kth = probs.topk(min(top_k, probs.shape[-1]), dim=-1).values[:, -1:]
        probs = probs.masked_fill(probs < kth, 0.0)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # keep a token if the mass before it is below top_p (the most likely token is always kept)
        drop_sorted = (sorted_probs.cumsum(-1) - sorted_probs) / sorted_probs.sum(-1, keepdim=True) >= top_p
        probs = probs.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), 0.0)
    return probs / probs.sum(-1, keepdim=True)


def sample_from(probs: torch.Tensor, sampler: str) -> torch.Tensor:
    """One token id per row of (already truncated and renormalised) probabilities.

    torch: by the inverse of the cumulative distribution, one uniform number per row (`torch.multinomial` draws
    one per vocabulary entry: 1.4 ms for two rows at V = 32k on one CPU thread, a third of a decode step). The
    uniform is kept below the total, so the token found always has a positive probability."""
    if sampler == "flashinfer":
        import flashinfer

        return flashinfer.sampling.sampling_from_probs(probs).long()
    cdf = probs.cumsum(-1)
    total = cdf[:, -1:]
    u = torch.minimum(torch.rand_like(total) * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, u, right=True)[:, 0]
