"""The payloads that cross actor boundaries, with shapes and dtypes per field and a cheap `check()`.

Sequences are packed: the ids of all samples are concatenated and `*_lens` says where each one ends.
Response token j of sample i is predicted by the hidden state at position `prompt_len_i + j - 1` of the
sequence `prompt_i + response_i`; every per-response-token tensor (`logprobs`, teacher hidden states,
teacher log-probs) is ordered like `response_ids`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

FINISH_REASONS = ("stop", "length")
# Who wrote a sample's response: the student (on-policy), the teacher's engine, or the dataset's gold answer
# (rollout.student_fraction < 1 and rollout.off_policy_source).
SOURCES = ("student", "teacher", "dataset")
STUDENT, TEACHER, DATASET = range(len(SOURCES))


@dataclass
class RolloutBatch:
    prompt_ids: Tensor  # [sum(prompt_lens)] int64, packed
    prompt_lens: Tensor  # [num_samples] int64
    response_ids: Tensor  # [num_response_tokens] int64, packed; includes the end-of-sequence token
    response_lens: Tensor  # [num_samples] int64, >= 1
    logprobs: Tensor  # [num_response_tokens] fp32, log-prob of each sampled token under the sampler
    prompt_index: Tensor  # [num_samples] int64, which prompt of the step each sample answers
    finish_reasons: list[str]  # [num_samples], "stop" (end-of-sequence sampled) or "length"
    policy_version: int  # the weight version the engine held when it sampled (-1: no sample is the student's)
    source: Tensor | None = None  # [num_samples] int64, index into SOURCES; None: every sample is the student's
    # [num_response_tokens] bool: the hybrid's gold-prefix tokens (given, not sampled: cross-entropy, log-prob 0);
    # None: none
    gold: Tensor | None = None
    # The learner's micro-batches, made once where the batch is born (`planned`) and travelling with it: which
    # samples each one packs, for a budget of `micro_batch_tokens` tokens (learner.micro_batch_tokens). The teacher
    # scores, and the learner trains, micro-batch by micro-batch of this plan.
    micro_batch_tokens: int | None = None
    micro_batch_plan: tuple[tuple[int, ...], ...] = ()

    def __post_init__(self):
        if self.source is None:
            self.source = torch.full((self.num_samples,), STUDENT, dtype=torch.int64)
        if self.gold is None:
            self.gold = torch.zeros(self.response_ids.shape, dtype=torch.bool)

    @classmethod
    def from_lists(cls, prompts: list[list[int]], responses: list[list[int]], logprobs: list | None = None, *,
                   prompt_index, finish_reasons: list[str], policy_version: int, source: int | Tensor = STUDENT,
                   gold_lens: list[int] | None = None) -> "RolloutBatch":
        """A checked batch from per-sample lists: each sample's prompt and response ids, the sampler's log-prob of
        each response token (a list or fp32 tensor per sample; None: 0, no sampler drew them), the prompt of the
        step it answers, and who wrote it (one SOURCES index for all, or a `[num_samples]` tensor). `gold_lens`:
        the hybrid's gold-prefix tokens opening each response."""
        n = len(prompts)
        logprobs = [[0.0] * len(r) for r in responses] if logprobs is None else logprobs
        gold = None if gold_lens is None else torch.cat(
            [torch.arange(len(r)) < g for r, g in zip(responses, gold_lens, strict=True)])
        return cls(
            prompt_ids=torch.tensor([t for p in prompts for t in p], dtype=torch.int64),
            prompt_lens=torch.tensor([len(p) for p in prompts], dtype=torch.int64),
            response_ids=torch.tensor([t for r in responses for t in r], dtype=torch.int64),
            response_lens=torch.tensor([len(r) for r in responses], dtype=torch.int64),
            logprobs=torch.cat([torch.as_tensor(lp, dtype=torch.float32) for lp in logprobs]),
            prompt_index=torch.as_tensor(prompt_index, dtype=torch.int64), finish_reasons=list(finish_reasons),
            policy_version=policy_version,
            source=source if isinstance(source, Tensor) else torch.full((n,), source, dtype=torch.int64),
            gold=gold).check()

    @property
    def num_samples(self) -> int:
        return int(self.prompt_lens.numel())

    @property
    def num_response_tokens(self) -> int:
        return int(self.response_ids.numel())

    def check(self) -> "RolloutBatch":
        n = self.num_samples
        assert self.prompt_ids.dtype == self.response_ids.dtype == torch.int64
        assert self.prompt_lens.shape == self.response_lens.shape == self.prompt_index.shape == (n,)
        assert len(self.finish_reasons) == n and set(self.finish_reasons) <= set(FINISH_REASONS)
        assert int(self.prompt_lens.sum()) == self.prompt_ids.numel()
        assert int(self.response_lens.sum()) == self.response_ids.numel() == self.logprobs.numel()
        assert n == 0 or int(self.response_lens.min()) >= 1
        assert self.logprobs.dtype == torch.float32
        assert self.source.dtype == torch.int64 and self.source.shape == (n,)
        assert n == 0 or 0 <= int(self.source.min()) <= int(self.source.max()) < len(SOURCES)
        assert self.gold.dtype == torch.bool and self.gold.shape == self.response_ids.shape
        assert self.micro_batch_tokens is None or sorted(i for g in self.micro_batch_plan for i in g) == list(range(n))
        return self

    def loss_rows(self, token_index: Tensor) -> tuple[dict[int, Tensor | None], Tensor | None]:
        """The rows of a micro-batch (its response tokens `token_index`) by what the loss does with them: the
        divergence's rows per sample source present (None: every row, the usual case, which indexes nothing),
        and the hybrid's gold-prefix rows for the cross-entropy (None: there are none)."""
        token_source, gold = self.token_source()[token_index], self.gold[token_index]
        trained = (~gold).nonzero()[:, 0] if bool(gold.any()) else None
        sources = token_source if trained is None else token_source[trained]
        if len(sources.unique()) == 1:
            return {int(sources[0]): trained}, None if trained is None else gold.nonzero()[:, 0]
        every = torch.arange(len(token_source)) if trained is None else trained
        return ({int(s): every[sources == s] for s in sources.unique()},
                None if trained is None else gold.nonzero()[:, 0])

    def with_gold_prefix(self, prefix_lens: list[int]) -> "RolloutBatch":
        """The hybrid: each sample was generated from its prompt followed by a gold prefix of `prefix_lens[i]`
        tokens (the prompt's last ones here); those become the first tokens of its response, marked `gold`
        (log-prob 0), so the teacher scores and the learner trains on prompt -> gold prefix + continuation."""
        prompts, responses, logprobs = self.prompts(), self.responses(), self.logprobs.split(self.response_lens.tolist())
        cut = [p[len(p) - k:] if k else [] for p, k in zip(prompts, prefix_lens, strict=True)]
        return RolloutBatch.from_lists(
            [p[:len(p) - k] for p, k in zip(prompts, prefix_lens)], [c + r for c, r in zip(cut, responses)],
            [torch.cat([torch.zeros(len(c)), lp]) for c, lp in zip(cut, logprobs)], prompt_index=self.prompt_index,
            finish_reasons=self.finish_reasons, policy_version=self.policy_version, source=self.source,
            gold_lens=prefix_lens)

    @property
    def on_policy(self) -> bool:
        """Whether any sample is the student's own (the policy version and the log-prob canary apply to those)."""
        return bool((self.source == STUDENT).any())

    def token_source(self) -> Tensor:
        """[num_response_tokens] int64: the source of each response token's sample."""
        return self.source.repeat_interleave(self.response_lens)

    @classmethod
    def concat(cls, parts: list["RolloutBatch"]) -> "RolloutBatch":
        """One batch from the shards several rollout replicas sampled, or from the student's and the off-policy
        samples of a step (samples in the order of `parts`; `prompt_index` stays the index into the step's
        prompts, which the caller gave each shard). The policy version is that of the student's shards."""
        versions = {p.policy_version for p in parts if p.on_policy} or {-1}
        assert len(versions) == 1, f"shards sampled with different weight versions {sorted(versions)}"
        return cls(*(torch.cat([getattr(p, f) for p in parts]) for f in _TENSOR_FIELDS),
                   finish_reasons=[r for p in parts for r in p.finish_reasons],
                   policy_version=versions.pop(), source=torch.cat([p.source for p in parts]),
                   gold=torch.cat([p.gold for p in parts])).check()

    def prompts(self) -> list[list[int]]:
        return [t.tolist() for t in torch.split(self.prompt_ids, self.prompt_lens.tolist())]

    def responses(self) -> list[list[int]]:
        return [t.tolist() for t in torch.split(self.response_ids, self.response_lens.tolist())]

    def padded(self, pad_id: int, prompts: list[list[int]] | None = None):
        """Right-padded `input_ids [B, T]`, `attention_mask [B, T]` and the flat indices (into `[B*T]`)
        of the positions that predict each response token, in `response_ids` order.

        `prompts` replaces the prompt of each sample (the teacher may render its own prompt prefix); the
        response ids never change.
        """
        prompts = self.prompts() if prompts is None else prompts
        responses = self.responses()
        lengths = [len(p) + len(r) for p, r in zip(prompts, responses, strict=True)]
        width = max(lengths)
        input_ids = torch.full((len(lengths), width), pad_id, dtype=torch.int64)
        attention_mask = torch.zeros((len(lengths), width), dtype=torch.int64)
        positions = []
        for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
            input_ids[i, : len(p) + len(r)] = torch.tensor(p + r, dtype=torch.int64)
            attention_mask[i, : len(p) + len(r)] = 1
            positions.append(i * width + torch.arange(len(p) - 1, len(p) + len(r) - 1))
        return input_ids, attention_mask, torch.cat(positions)


    def plan(self, max_tokens: int, prompts: list[list[int]] | None = None) -> list[tuple[int, ...]]:
        """Which samples go into each micro-batch of at most `max_tokens` tokens (0: one micro-batch of the
        whole batch): `pack_sequences` over the lengths of prompt + response. `prompts` as in `padded`."""
        return [tuple(g) for g in pack_sequences(self.lengths(prompts), max_tokens)]

    def lengths(self, prompts: list[list[int]] | None = None) -> list[int]:
        """Each sample's prompt + response length (`prompts` as in `padded`)."""
        if prompts is None:
            return (self.prompt_lens + self.response_lens).tolist()
        return [len(p) + int(r) for p, r in zip(prompts, self.response_lens.tolist(), strict=True)]

    def pack(self, samples: tuple[int, ...] | list[int], prompts: list[list[int]] | None = None) -> "PackedRows":
        """The `samples` (prompt + response) in one row, position ids restarting at 0 for each sequence, no
        padding. `prompts` replaces each sample's prompt as in `padded`."""
        p_starts = (torch.cumsum(self.prompt_lens, 0) - self.prompt_lens).tolist()
        r_starts = (torch.cumsum(self.response_lens, 0) - self.response_lens).tolist()
        ids, pos, where, offset = [], [], [], 0
        for i in samples:
            p_len, r_len = int(self.prompt_lens[i]), int(self.response_lens[i])
            prompt = self.prompt_ids[p_starts[i]:p_starts[i] + p_len] if prompts is None else torch.tensor(
                prompts[i], dtype=torch.int64)
            ids += [prompt, self.response_ids[r_starts[i]:r_starts[i] + r_len]]
            n_p = prompt.numel()
            pos.append(torch.arange(n_p + r_len))
            where.append(offset + torch.arange(n_p - 1, n_p + r_len - 1))
            offset += n_p + r_len
        return PackedRows(input_ids=torch.cat(ids)[None], position_ids=torch.cat(pos)[None],
                          positions=torch.cat(where), token_index=self.token_index(samples), samples=tuple(samples))

    def token_index(self, samples: tuple[int, ...] | list[int]) -> Tensor:
        """The indices (in `response_ids` order) of the response tokens of `samples`, sample after sample."""
        starts = (torch.cumsum(self.response_lens, 0) - self.response_lens).tolist()
        return torch.cat([starts[i] + torch.arange(int(self.response_lens[i])) for i in samples])

    def planned(self, max_tokens: int) -> "RolloutBatch":
        """This batch with its micro-batch plan (`plan`: at most `max_tokens` tokens each, 0: one micro-batch),
        made where the batch is born: the rollout actor, the teacher's off-policy samples, the dataset's, a merge."""
        return dataclasses.replace(self, micro_batch_tokens=max_tokens, micro_batch_plan=tuple(self.plan(max_tokens)))

    def planned_groups(self) -> list[tuple[int, ...]]:
        """The plan the batch carries (see `planned`)."""
        if self.micro_batch_tokens is None:
            raise RuntimeError("this RolloutBatch has no micro-batch plan: plan it where it is made, "
                               "batch.planned(cfg.learner.micro_batch_tokens)")
        return list(self.micro_batch_plan)

    def micro_batches(self, max_tokens: int, prompts: list[list[int]] | None = None) -> list["PackedRows"]:
        """The batch's sequences packed into micro-batches of at most `max_tokens` tokens each (`plan`), one
        row per micro-batch (`pack`). A sequence longer than the budget gets a micro-batch of its own.

        Memory and time of a forward over one micro-batch grow with `max_tokens`, not with the batch."""
        return [self.pack(samples, prompts) for samples in self.plan(max_tokens, prompts)]


def group_rows(groups: list[tuple[int, ...]], lengths: list[int], max_tokens: int):
    """Rows of at most `max_tokens` tokens (0: one row) made of whole groups of samples, in order: consecutive
    groups share a row while they fit; a group larger than the budget is split over rows of its own
    (`pack_sequences` within it). Yields `(samples of the row, indices of the groups complete after it)`.

    The teacher scores the learner's micro-batches (the groups) in rows of its own budget this way, so that each
    micro-batch's states can leave as soon as its last row is done."""
    row: list[int] = []
    done: list[int] = []
    load = 0
    for g, samples in enumerate(groups):
        size = sum(lengths[i] for i in samples)
        if row and max_tokens > 0 and load + size > max_tokens:
            yield row, done
            row, done, load = [], [], 0
        if max_tokens > 0 and size > max_tokens:
            subs = pack_sequences([lengths[i] for i in samples], max_tokens)
            for j, sub in enumerate(subs):
                yield [samples[i] for i in sub], [g] if j == len(subs) - 1 else []
            continue
        row += samples
        done.append(g)
        load += size
    if row:
        yield row, done


def pack_sequences(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Group sequences (by index) into bins of at most `max_tokens` tokens (0: one bin), balanced by tokens.

    Longest first, each into the least-filled bin it fits in, starting from the fewest bins the total allows
    (ceil(total / max_tokens)) and opening another only when none fits: the bins' token counts come out nearly
    equal instead of full bins and a small remainder. A sequence longer than `max_tokens` takes a bin of its own.
    Deterministic; the samples in a bin keep the batch's order."""
    if not lengths:
        return []
    if max_tokens <= 0:
        return [list(range(len(lengths)))]
    bins: list[list[int]] = [[] for _ in range(max(1, -(-sum(lengths) // max_tokens)))]
    loads = [0] * len(bins)
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        fits = [b for b in range(len(bins)) if loads[b] + lengths[i] <= max_tokens or not bins[b]]
        if fits:
            b = min(fits, key=lambda b: (loads[b], b))
        else:
            bins.append([])
            loads.append(0)
            b = len(bins) - 1
        bins[b].append(i)
        loads[b] += lengths[i]
    return [sorted(b) for b in bins if b]


def padding_waste(packs: list["PackedRows"], max_tokens: int) -> float:
    """The fraction of the micro-batches' token budget left empty (what padding every row to the budget would
    have cost); 0 for one micro-batch of the whole batch (max_tokens 0)."""
    if max_tokens <= 0 or not packs:
        return 0.0
    capacity = sum(max(max_tokens, p.num_tokens) for p in packs)
    return 1.0 - sum(p.num_tokens for p in packs) / capacity


@dataclass
class PackedRows:
    """One micro-batch: whole sequences of a RolloutBatch packed into one row, ready for a decoder forward with
    `position_ids` and no attention mask (transformers then keeps each sequence's attention to itself)."""

    input_ids: Tensor  # [1, num_tokens] int64
    position_ids: Tensor  # [1, num_tokens] int64, 0, 1, ... restarting at each sequence
    positions: Tensor  # [n] int64: the row positions whose hidden states predict this micro-batch's response tokens
    token_index: Tensor  # [n] int64: those tokens' indices in the batch's `response_ids` order
    samples: tuple[int, ...]  # the batch's samples in this micro-batch

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[1])


_TENSOR_FIELDS = ("prompt_ids", "prompt_lens", "response_ids", "response_lens", "logprobs", "prompt_index")


@dataclass
class TeacherScores:
    """What the loss needs from the teacher for one of the learner's micro-batches (`RolloutBatch.plan` with
    `learner.micro_batch_tokens`): hidden states (full-vocabulary losses) or the log-prob of each sampled token
    (sampled-token loss); the other field is None. The teacher sends one per micro-batch as soon as it is scored,
    so neither side holds the whole step's states (only the object store does, in cpu mode)."""

    policy_version: int  # copied from the RolloutBatch it scores
    micro_batch: int  # which of the plan's micro-batches
    token_index: Tensor  # [n] int64: its response tokens' indices in the batch's `response_ids` order
    # [n, d_teacher] in the teacher's dtype (fp32 / bf16 / fp16), final (normed) hidden states, ordered like
    # token_index; the learner's loss widens them to fp32 one chunk at a time. In the GPU modes a
    # transport.hidden_states.RemoteTensor (same shape and dtype) that the learner fetches
    hidden_states: Tensor | None = None
    token_logprobs: Tensor | None = None  # [n] fp32, log p_T(sampled token) at loss temperature

    def check(self, batch: RolloutBatch) -> "TeacherScores":
        assert (self.hidden_states is None) != (self.token_logprobs is None), "exactly one of the two"
        n = self.token_index.numel()
        assert self.token_index.dtype == torch.int64 and self.token_index.shape == (n,)
        if self.hidden_states is not None:
            assert len(self.hidden_states.shape) == 2 and self.hidden_states.shape[0] == n
            assert self.hidden_states.dtype in (torch.float32, torch.bfloat16, torch.float16)
        else:
            assert self.token_logprobs.shape == (n,)
            assert self.token_logprobs.dtype == torch.float32
        assert self.policy_version == batch.policy_version
        return self


@dataclass
class OutputHead:
    """A model's output projection, sent once from the teacher to the learner (it is frozen)."""

    weight: Tensor  # [V_rows, d] in the teacher's dtype; rows >= valid_vocab are padding and are masked to -inf
    valid_vocab: int  # the tokenizer's vocabulary size
