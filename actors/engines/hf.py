"""The reference rollout engine: a transformers model and `generate`, on CPU or one GPU.

It follows the engine protocol every engine implements: `generate`, `load_weights`, `weight_version`,
`release_memory`, `resume_memory`.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedModel

from cluster.weights import WeightUpdate, attach_parameters, attach_serving
from opd.batch import RolloutBatch


class HFEngine:
    def __init__(self, model: PreTrainedModel, *, eos_id: int, pad_id: int):
        self.model = model.eval()
        self.eos_id, self.pad_id = eos_id, pad_id
        self._version = -1  # no weights published yet

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
        self._version = update.version
        return self._version

    def release_memory(self) -> None:  # nothing to release on CPU
        pass

    def resume_memory(self) -> None:
        pass

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], *, num_samples: int = 1, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 0, max_new_tokens: int, greedy: bool = False,
                 seed: int | None = None) -> RolloutBatch:
        """Sample `num_samples` responses per prompt (token ids in, token ids out).

        Log-probs are those of the distribution actually sampled from (after temperature, top-k, top-p).
        """
        device = self.model.device
        flat = [p for p in prompts for _ in range(num_samples)]
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
                                  **sampling)
        if seed is not None:
            torch.manual_seed(seed)  # generate samples from the global generator
        out = self.model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                  generation_config=config)
        new_ids = out.sequences[:, width:].cpu()
        # scores are the processed logits each token was sampled from; normalise them to log-probs.
        logprobs = self.model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True).cpu()

        responses, response_logprobs, lens, reasons = [], [], [], []
        for ids, lps in zip(new_ids.tolist(), logprobs, strict=True):
            end = ids.index(self.eos_id) + 1 if self.eos_id in ids else len(ids)
            responses += ids[:end]
            response_logprobs.append(lps[:end])
            lens.append(end)
            reasons.append("stop" if ids[end - 1] == self.eos_id else "length")
        return RolloutBatch(
            prompt_ids=torch.tensor([t for p in flat for t in p], dtype=torch.int64),
            prompt_lens=torch.tensor([len(p) for p in flat], dtype=torch.int64),
            response_ids=torch.tensor(responses, dtype=torch.int64),
            response_lens=torch.tensor(lens, dtype=torch.int64),
            logprobs=torch.cat(response_logprobs).float(),
            prompt_index=torch.arange(len(prompts)).repeat_interleave(num_samples),
            finish_reasons=reasons,
            policy_version=self._version,
        ).check()
