"""TeacherActor: forwards over prompt + response ids; sends the final hidden states at response positions, one
of the learner's micro-batches at a time (the learner recomputes teacher logits chunk by chunk from these and the
frozen output head)."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from opd.actors.common import actor_device, init_process, join_groups, load, special_ids
from opd.actors.common import memory_stats, reset_peak_memory, return_cached_memory
from opd.actors.engines.hf import HFEngine
from opd.kernels.chunked import chunked_token_logprobs
from opd.batch import TEACHER, OutputHead, RolloutBatch, TeacherScores, group_rows
from opd.config import Config
from opd.modes import state_outbox


class TeacherActor:
    def __init__(self, cfg: Config, replica: int = 0):
        init_process(cfg)
        self.cfg = cfg
        self.device = actor_device(cfg)
        self.eos_id, self.pad_id, self.vocab_size = special_ids(cfg.model.teacher)
        self.model = load(cfg, "teacher").to(self.device).eval().requires_grad_(False)
        # hidden states leave through the object store (cpu), an IPC handle (colocated) or a send (split)
        self.outbox = state_outbox(cfg, rank=1 + replica)
        # greedy answers for evaluation, and samples with rollout.student_fraction < 1: the engine's decode loop
        self.engine = HFEngine(self.model, eos_id=self.eos_id, pad_id=self.pad_id, sampler="torch",
                               valid_vocab=self.vocab_size, max_batch_tokens=cfg.rollout.max_batch_tokens)

    memory_stats, reset_peak_memory = memory_stats, reset_peak_memory  # the benchmark's peak memory

    def output_head(self) -> OutputHead:
        # in the teacher's own dtype (model.dtype): the loss widens it a chunk's operands at a time (fp32
        # compute) or uses it as it is (bf16 compute), the same values as an fp32 copy at half the bytes
        weight = self.model.get_output_embeddings().weight.detach().cpu().clone()
        return OutputHead(weight=weight, valid_vocab=self.vocab_size)

    @torch.no_grad()
    def score(self, batch: RolloutBatch, *, replica: int = 0, replicas: int = 1, hidden_states: bool | None = None,
              teacher_prompts: list[list[int]] | None = None) -> Iterator[TeacherScores]:
        """One TeacherScores per micro-batch of the learner's plan, which the batch carries (`batch.planned`)
        that this replica scores (micro-batch k goes to replica k % replicas), in order, each yielded as soon as
        it is done: hidden states at its response positions for full-vocabulary losses (and for evaluation,
        which asks with hidden_states=True); for sampled_rkl only the sampled tokens' log-probs. Under Ray this
        is a streaming generator: each part goes to the object store (or the outbox) when yielded, and this
        process holds at most the states of the row it is scoring.

        teacher_prompts: the teacher's own rendering of each prompt of the step (indexed like the prompts the
        batch was sampled from); the response ids are scored unchanged after it."""
        batch.check()
        prompts = None if teacher_prompts is None else [teacher_prompts[i] for i in batch.prompt_index.tolist()]
        states = hidden_states if hidden_states is not None else self.cfg.loss.kind != "sampled_rkl"
        plan = batch.planned_groups()
        mine = list(range(replica, len(plan), replicas))
        self.outbox.begin()  # what the last batches exported stays alive for the learner; older parts go
        decoder = self.model.get_decoder()  # its last hidden state is already final-normed: no [T, V] logits made
        per_sample: dict[int, torch.Tensor] = {}  # [response_len, d_t] in the model's dtype, until its part leaves
        # Rows of at most teacher.micro_batch_tokens tokens made of the learner's micro-batches, no KV cache:
        # memory follows the two budgets; only the response positions' states are kept.
        for row, complete in group_rows([plan[k] for k in mine], batch.lengths(prompts),
                                        self.cfg.teacher.micro_batch_tokens):
            packed = batch.pack(row, prompts)
            hidden_1Td = decoder(input_ids=packed.input_ids.to(self.device),
                                 position_ids=packed.position_ids.to(self.device), use_cache=False).last_hidden_state
            ends = torch.cumsum(batch.response_lens[list(row)], 0).tolist()
            hidden_nd = hidden_1Td[0, packed.positions.to(self.device)]
            del hidden_1Td
            per_sample.update(zip(row, torch.tensor_split(hidden_nd, ends[:-1])))
            del hidden_nd
            for g in complete:
                k = mine[g]
                part = torch.cat([per_sample.pop(i) for i in plan[k]])
                yield self._part(batch, k, batch.token_index(plan[k]), part, states)
        return_cached_memory(self.cfg, self.device)  # colocated: the forwards' transients go back to the GPU

    def _part(self, batch: RolloutBatch, k: int, token_index: torch.Tensor, hidden: torch.Tensor,
              states: bool) -> TeacherScores:
        if states:  # sent in the model's dtype; the learner's loss widens it to fp32 one chunk at a time
            return TeacherScores(batch.policy_version, k, token_index, hidden_states=self.outbox.export(hidden))
        logprobs = chunked_token_logprobs(hidden, self.model.get_output_embeddings().weight,
                                          batch.response_ids[token_index].to(self.device),
                                          temperature=self.cfg.loss.temperature, valid_vocab=self.vocab_size)
        return TeacherScores(batch.policy_version, k, token_index, token_logprobs=logprobs.cpu())

    join_groups = join_groups  # split mode: rank 1 + replica of the hidden-states group

    def alive(self) -> bool:
        return True

    def send_pending(self) -> int:
        """split mode: send the hidden states scored since the last call; the learner receives them meanwhile."""
        return self.outbox.send()

    def generate(self, prompts: list[list[int]], *, max_new_tokens: int) -> RolloutBatch:
        """Greedy answers of the teacher (evaluation: the accuracy the student is measured against)."""
        return self.engine.generate(prompts, max_new_tokens=max_new_tokens, greedy=True)

    @torch.no_grad()
    def sample(self, prompts: list[list[int]], teacher_prompts: list[list[int]] | None, *, seed: int) -> RolloutBatch:
        """Off-policy samples (rollout.student_fraction < 1, off_policy_source=teacher): the teacher answers
        `teacher_prompts` (its own rendering, else `prompts`) with the rollout's settings; the batch carries the
        student's `prompts`, which the learner trains on, and the teacher's sampling log-probs."""
        r = self.cfg.rollout
        out = self.engine.generate(prompts if teacher_prompts is None else teacher_prompts,
                                   num_samples=r.num_samples, temperature=r.temperature, top_p=r.top_p,
                                   top_k=r.top_k, max_new_tokens=r.max_new_tokens, seed=seed,
                                   ignore_eos=r.ignore_eos)
        mine = [prompts[i] for i in out.prompt_index.tolist()]
        return RolloutBatch.from_lists(mine, out.responses(), out.logprobs.split(out.response_lens.tolist()),
                                       prompt_index=out.prompt_index, finish_reasons=out.finish_reasons,
                                       policy_version=-1, source=TEACHER)
