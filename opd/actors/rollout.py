"""RolloutActor: owns one engine; samples responses from token ids; receives weight updates."""

from __future__ import annotations

from opd.actors.common import actor_device, init_process, join_groups, load, special_ids
from opd.actors.common import memory_stats, reset_peak_memory, return_cached_memory
from opd.actors.engines.hf import HFEngine, resolve_sampler
from opd.batch import RolloutBatch
from opd.config import Config
from opd.models import model_source
from opd.modes import weight_route
from opd.transport.weights import WeightUpdate


class RolloutActor:
    def __init__(self, cfg: Config, replica: int = 0):
        init_process(cfg)
        self.cfg, self.replica = cfg, replica
        eos_id, pad_id, _ = special_ids(cfg.model.student)
        self.sglang = cfg.rollout.engine == "sglang"
        self.weights = weight_route(cfg)  # how the learner's weights arrive (opd/modes.py)
        if self.sglang:
            from opd.actors.engines.sglang import SGLangEngine

            device = actor_device(cfg)  # the GPU Ray assigned, checked (cuda_index), or the CPU
            self.engine = SGLangEngine.from_config(model_source(cfg.model.student), eos_id=eos_id,
                                                   mem_fraction_static=cfg.rollout.mem_fraction,
                                                   dtype=cfg.model.dtype, random_seed=cfg.train.seed + replica,
                                                   device=device.type, gpu_id=device.index or 0)
        else:
            device = actor_device(cfg)
            # the dtype of what the learner publishes (cpu: its fp32 master weights; the GPU modes: model.dtype)
            model = load(cfg, "student", dtype=self.weights.engine_dtype)
            # a mapped serving buffer: the parameters become views of it at the first sync, straight from host
            # memory; moving them to the GPU first would strand a second copy of the student there
            model = model if self.weights.engine_on_host else model.to(device)
            self.engine = HFEngine(model, eos_id=eos_id, pad_id=pad_id, compile=cfg.rollout.compile,
                                   max_batch_tokens=cfg.rollout.max_batch_tokens,
                                   sampler=resolve_sampler(cfg.rollout.sampler, device))

    def generate(self, prompts: list[list[int]], *, seed: int, greedy: bool = False,
                 prefixes: list[list[int]] | None = None) -> RolloutBatch:
        """`prefixes` (the hybrid): each prompt's gold prefix, which the student continues; in the batch it opens
        the response, marked gold (RolloutBatch.with_gold_prefix)."""
        r = self.cfg.rollout
        self.engine.resume_memory()  # the KV cache, if released after the last generate
        batch = self.engine.generate(
            prompts if prefixes is None else [p + g for p, g in zip(prompts, prefixes, strict=True)],
            num_samples=1 if greedy else r.num_samples, temperature=r.temperature, top_p=r.top_p,
            top_k=r.top_k, max_new_tokens=r.max_new_tokens, greedy=greedy, seed=seed,
            ignore_eos=r.ignore_eos and not greedy)
        if self.sglang:
            # Hand the KV cache (and CUDA graphs) to the teacher and learner until the next generate. The weights
            # stay: a sync updates them in place, and an evaluation can generate without a sync.
            self.engine.release_memory(["kv_cache", "cuda_graph"])
        else:  # colocated on a GPU: the decode loop's KV cache, freed when it returned, goes back to the device
            return_cached_memory(self.cfg, self.engine.model.device)
        if prefixes is not None:
            batch = batch.with_gold_prefix([len(prefixes[i]) for i in batch.prompt_index.tolist()])
        return batch.planned(self.cfg.learner.micro_batch_tokens)  # the plan the teacher and learner follow

    def load_weights(self, update: WeightUpdate) -> int:
        """The learner's update to the engine: mapped, received by broadcast, or through sglang's update calls."""
        return self.weights.load(self.engine, update)

    join_groups = join_groups  # split mode, hf engine: rank 1 + replica of the weights group

    def join_sglang_group(self, master_address: str, master_port: int, world_size: int, group_name: str) -> None:
        """split mode, sglang engine: open the weight-update group the learner joins as rank 0."""
        self.engine.init_weights_group(master_address, master_port, rank_offset=1 + self.replica,
                                       world_size=world_size, group_name=group_name)

    def weight_version(self) -> int:
        return self.engine.weight_version()

    memory_stats, reset_peak_memory = memory_stats, reset_peak_memory  # the benchmark's peak memory

    def logits(self, input_ids):
        """Full logits of the engine's model (tests and canaries only)."""
        import torch

        with torch.no_grad():
            return self.engine.model(input_ids=input_ids).logits
