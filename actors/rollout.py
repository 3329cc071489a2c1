"""RolloutActor: owns one engine; samples responses from token ids; receives weight updates."""

from __future__ import annotations

from actors.common import init_process, load, special_ids
from actors.engines.hf import HFEngine
from cluster.weights import WeightUpdate
from opd.batch import RolloutBatch
from opd.config import Config


class RolloutActor:
    def __init__(self, cfg: Config):
        init_process(cfg)
        self.cfg = cfg
        eos_id, pad_id, _ = special_ids(cfg.model.student)
        # cpu mode: the engine's parameters become views of the learner's fp32 buffer, so load it in fp32
        self.engine = HFEngine(load(cfg, "student", dtype="float32"), eos_id=eos_id, pad_id=pad_id)

    def generate(self, prompts: list[list[int]], *, seed: int, greedy: bool = False) -> RolloutBatch:
        r = self.cfg.rollout
        return self.engine.generate(
            prompts, num_samples=1 if greedy else r.num_samples, temperature=r.temperature, top_p=r.top_p,
            top_k=r.top_k, max_new_tokens=r.max_new_tokens, greedy=greedy, seed=seed)

    def load_weights(self, update: WeightUpdate) -> int:
        return self.engine.load_weights(update)

    def weight_version(self) -> int:
        return self.engine.weight_version()

    def logits(self, input_ids):
        """Full logits of the engine's model (tests and canaries only)."""
        import torch

        with torch.no_grad():
            return self.engine.model(input_ids=input_ids).logits
