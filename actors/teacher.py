"""TeacherActor: one forward pass over prompt + response ids; returns final hidden states at response
positions (the learner recomputes teacher logits chunk by chunk from these and the frozen output head)."""

from __future__ import annotations

import torch

from actors.common import actor_device, init_process, join_groups, load, special_ids
from actors.common import memory_stats, reset_peak_memory, return_cached_memory
from actors.engines.hf import HFEngine
from cluster.resources import hidden_transport
from cluster.transport import Outbox
from kernels.chunked import chunked_token_logprobs
from opd.batch import OutputHead, RolloutBatch, TeacherScores
from opd.config import Config


class TeacherActor:
    def __init__(self, cfg: Config, replica: int = 0):
        init_process(cfg)
        self.cfg = cfg
        self.device = actor_device(cfg)
        self.eos_id, self.pad_id, self.vocab_size = special_ids(cfg.model.teacher)
        self.model = load(cfg, "teacher").to(self.device).eval().requires_grad_(False)
        # hidden states leave through the object store (cpu), an IPC handle (colocated) or a send (split)
        self.outbox = Outbox(hidden_transport(cfg), rank=1 + replica)
        # for evaluation only (greedy answers); on a GPU the decode loop, which keeps no per-step [B, V] scores
        self.engine = HFEngine(self.model, eos_id=self.eos_id, pad_id=self.pad_id,
                               sampler="torch" if self.device.type == "cuda" else None)

    memory_stats, reset_peak_memory = memory_stats, reset_peak_memory  # the benchmark's peak memory

    def output_head(self) -> OutputHead:
        weight = self.model.get_output_embeddings().weight.detach().float().cpu().clone()
        return OutputHead(weight=weight, valid_vocab=self.vocab_size)

    @torch.no_grad()
    def score(self, batch: RolloutBatch, *, hidden_states: bool | None = None,
              teacher_prompts: list[list[int]] | None = None) -> TeacherScores:
        """Hidden states at response positions for full-vocabulary losses (and for evaluation, which asks
        with hidden_states=True); for sampled_rkl only the sampled tokens' log-probs.

        teacher_prompts: the teacher's own rendering of each prompt of the step (indexed like the prompts the
        batch was sampled from); the response ids are scored unchanged after it."""
        batch.check()
        prompts = None if teacher_prompts is None else [teacher_prompts[i] for i in batch.prompt_index.tolist()]
        decoder = self.model.get_decoder()  # its last hidden state is already final-normed: no [T, V] logits made
        hidden = torch.empty(batch.num_response_tokens, self.model.config.get_text_config().hidden_size,
                             dtype=self.model.dtype, device=self.device)  # [num_response_tokens, d_t], model dtype
        # One packed row of at most teacher.micro_batch_tokens tokens at a time, no KV cache: memory follows the
        # budget; only the response positions' states are kept.
        for packed in batch.micro_batches(self.cfg.teacher.micro_batch_tokens, prompts=prompts):
            hidden_1Td = decoder(input_ids=packed.input_ids.to(self.device),
                                 position_ids=packed.position_ids.to(self.device), use_cache=False).last_hidden_state
            hidden[packed.token_index.to(self.device)] = hidden_1Td[0, packed.positions.to(self.device)]
        del hidden_1Td
        return_cached_memory(self.cfg, self.device)  # colocated: the forward's transients go back to the GPU
        if hidden_states if hidden_states is not None else self.cfg.loss.kind != "sampled_rkl":
            # sent in the model's dtype; the learner's loss widens it to fp32 one chunk at a time
            return TeacherScores(policy_version=batch.policy_version, hidden_states=self.outbox.export(hidden)).check(batch)
        logprobs = chunked_token_logprobs(hidden, self.model.get_output_embeddings().weight,
                                          batch.response_ids.to(self.device), temperature=self.cfg.loss.temperature,
                                          valid_vocab=self.vocab_size)
        return TeacherScores(policy_version=batch.policy_version, token_logprobs=logprobs.cpu()).check(batch)

    join_groups = join_groups  # split mode: rank 1 + replica of the hidden-states group

    def alive(self) -> bool:
        return True

    def send_pending(self) -> int:
        """split mode: send the hidden states scored since the last call; the learner receives them meanwhile."""
        return self.outbox.send()

    def generate(self, prompts: list[list[int]], *, max_new_tokens: int) -> RolloutBatch:
        """Greedy answers of the teacher (evaluation: the accuracy the student is measured against)."""
        return self.engine.generate(prompts, max_new_tokens=max_new_tokens, greedy=True)
