"""LearnerActor: the student forward, the chunked divergence to the teacher, the optimizer step.

One learner: its parameters live in a shared flat buffer that the cpu-mode rollout engine maps
(opd/transport/weights.py), so the optimizer step *is* the weight update; `export_weights` only says which version
that is. `run.learner_replicas=N`: N of these, rank 0..N-1, the student sharded across them by FSDP2
(opd/data_parallel.py); each gathers the whole weights into its own serving buffer at a sync.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import get_scheduler

from opd.actors.common import actor_device, init_process, join_groups, load, special_ids
from opd.actors.common import memory_stats, reset_peak_memory, return_cached_memory
from opd.kernels.chunked import chunked_cross_entropy, chunked_divergence, chunked_sampled_rkl, chunked_token_logprobs
from opd import checkpoint, data_parallel
from opd.batch import SOURCES, STUDENT, OutputHead, PackedRows, RolloutBatch, TeacherScores, padding_waste
from opd.config import Config
from opd.metrics import loss_metrics
from opd.models import model_source
from opd.modes import weight_route
from opd.transport import hidden_states, weights


class LearnerActor:
    def __init__(self, cfg: Config, rank: int = 0, init_method: str = ""):
        """`rank` of run.learner_replicas; `init_method`: rank 0's rendezvous address (tcp://host:port), when
        there are several."""
        init_process(cfg)
        torch.manual_seed(cfg.train.seed)
        self.cfg, self.rank, self.world = cfg, rank, cfg.run.learner_replicas
        self.eos_id, self.pad_id, self.vocab_size = special_ids(cfg.model.student)
        self.device = actor_device(cfg)
        self.model = load(cfg, "student", dtype="float32").to(self.device).train()  # fp32 master weights
        if cfg.learner.gradient_checkpointing:  # each layer's activations recomputed in backward
            if hasattr(self.model, "activation_checkpointing_enable"):  # the name in recent transformers 5.x
                self.model.activation_checkpointing_enable({"use_reentrant": False})
            else:
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        lc = cfg.learner
        self.autocast = lc.compute_dtype == "bfloat16"  # bf16 matmuls over the fp32 master weights
        self.student = data_parallel.Student(self.model)  # the forward that FSDP shards (one replica: as is)
        if self.world > 1:
            data_parallel.shard(self.student, data_parallel.init_group(rank, self.world, init_method, self.device),
                                bf16=self.autocast and self.device.type == "cuda")
        # how the weights reach the engines (opd/modes.py weight_route): the fp32 master weights mapped as they are
        # (cpu, one learner), or a flat copy in the serving dtype that every sync refreshes in place and the
        # engines map or receive (sharded: each replica gathers the whole weights into its own copy)
        if self.device.type == "cpu":
            weights.reclaim_stale()  # what learners killed before their shutdown left in /dev/shm
        self.weights = weight_route(cfg)
        self.weights.setup(self.model, self.device, f"student-{uuid.uuid4().hex[:8]}")
        self._weights_group = None  # split mode, sglang engines: the torch.distributed group they joined
        # fused: one kernel for all parameters on CUDA (fp32 state either way; sharded: this replica's shards)
        self.optimizer = torch.optim.AdamW(self.student.parameters(), lr=lc.lr, betas=lc.adam_betas,
                                           weight_decay=lc.weight_decay, fused=self.device.type == "cuda")
        name = {"constant": "constant_with_warmup"}.get(lc.lr_schedule, lc.lr_schedule)
        self.scheduler = get_scheduler(name, self.optimizer, num_warmup_steps=lc.warmup_steps,
                                       num_training_steps=cfg.train.steps)
        self.version = 0
        self.teacher_head: OutputHead | None = None
        self._exported = False

    def set_teacher_head(self, head: OutputHead) -> None:
        if head.valid_vocab != self.vocab_size:
            raise ValueError(f"student and teacher tokenizers differ in size ({self.vocab_size} vs "
                             f"{head.valid_vocab}): distil between models that share a tokenizer")
        self.teacher_head = OutputHead(head.weight.to(self.device), head.valid_vocab)

    join_groups = join_groups  # split mode: rank 0 of the weights group and of the hidden-states group

    def endpoint(self) -> tuple[str, int]:
        """An address and free port on this node for a torch.distributed rendezvous (rank 0 listens)."""
        from opd.transport.groups import free_endpoint

        return free_endpoint()

    def join_sglang_group(self, master_address: str, master_port: int, world_size: int, group_name: str) -> None:
        """split mode with sglang engines: rank 0 of the torch.distributed group they open with
        `init_weights_update_group` at the same time (sglang's own helper, so both ends agree)."""
        from sglang.srt.utils import init_custom_process_group

        self._weights_group = init_custom_process_group(
            backend="nccl" if self.device.type == "cuda" else "gloo", world_size=world_size, rank=0,
            init_method=f"tcp://{master_address}:{master_port}", group_name=group_name)

    memory_stats, reset_peak_memory = memory_stats, reset_peak_memory  # the benchmark's peak memory

    def export_weights(self, full: bool = False) -> weights.WeightUpdate:
        """This sync's update (WeightRoute.export): the first one (or a `full` one, for an engine that was
        restarted) carries what the engine maps, later ones refresh the buffer and carry the version."""
        first = full or not self._exported
        self._exported = True
        return self.weights.export(self.model, self.version, first)

    @property
    def shared(self) -> weights.SharedWeights | None:
        return self.weights.shared  # cpu, one learner: the fp32 master weights' shared file

    @property
    def serving(self) -> weights.ServingBuffer | None:
        return self.weights.serving  # the GPU modes (and sharded cpu learners): the serving-dtype copy

    def weight_version(self) -> int:
        return self.version

    def broadcast_weights(self) -> int:
        """split mode: send the serving buffer (refreshed by export_weights) to every engine, bucket by bucket."""
        self.weights.broadcast(self._weights_group)
        return self.version

    def _part(self, batch: RolloutBatch, packed: PackedRows, k: int, parts: Sequence) -> TeacherScores:
        """The teacher's scores of micro-batch `k` (`packed`), fetched to this device: from the object store (a ref
        the driver passed on; only now is it pulled here), mapped through IPC, or received over the collective
        group. Only one micro-batch's states are here at a time."""
        part = parts[k]
        if not isinstance(part, TeacherScores):  # a ray.ObjectRef of one
            import ray

            part = ray.get(part)
        # the plan travels with the batch (RolloutBatch.planned): both sides read the same one
        if part.micro_batch != k or not torch.equal(part.token_index, packed.token_index):
            raise RuntimeError(f"the teacher's part {part.micro_batch} does not cover micro-batch {k} of the batch's "
                               f"plan: pass the parts TeacherActor.score made of this batch, in plan order")
        return TeacherScores(part.policy_version, k, part.token_index,
                             hidden_states=hidden_states.fetch(part.hidden_states, self.device),
                             token_logprobs=hidden_states.fetch(part.token_logprobs, self.device)).check(batch)

    def _plan(self, batch: RolloutBatch, parts: Sequence) -> list[PackedRows]:
        """The batch's micro-batches, packed as its plan says (the teacher scored one part per micro-batch)."""
        packs = [batch.pack(samples) for samples in batch.planned_groups()]
        if len(parts) != len(packs):
            raise RuntimeError(f"{len(parts)} teacher parts for the batch's {len(packs)} micro-batches: pass the parts "
                               f"TeacherActor.score made of this batch")
        return packs

    def _forward(self, packed: PackedRows, loss_fn):
        """`loss_fn(h_s, w_s)` on the student's final hidden states at the positions predicting the micro-batch's
        response tokens and its output embedding (data_parallel.Student)."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            return self.student(packed.input_ids.to(self.device), packed.position_ids.to(self.device),
                                packed.positions.to(self.device), loss_fn)

    def _micro_batch_loss(self, packed: PackedRows, batch: RolloutBatch, part: TeacherScores, num_tokens: int):
        """This micro-batch's share of the step's loss (normalised by all `num_tokens` response tokens of the
        step, so the shares add up to the whole batch's loss), its detached stats (`[SOURCES, 3]` sums of the
        divergence's stats per sample source, flattened, then the gold tokens' negative log-likelihood), and the
        canary: the largest gap between the learner's and the sampler's log-prob of a token the student sampled
        (before the step changes the weights; comparable only without top-k / top-p truncation).

        The divergence covers every response token but the hybrid's gold-prefix tokens, which get
        loss.sft_weight x cross-entropy instead."""
        lc, r = self.cfg.loss, self.cfg.rollout
        index = packed.token_index.to(self.device)
        sampled_ids, sampled_logprobs = batch.response_ids.to(self.device)[index], batch.logprobs.to(self.device)[index]
        groups, gold_rows = batch.loss_rows(packed.token_index)
        groups = {s: None if rows is None else rows.to(self.device) for s, rows in groups.items()}
        gold_rows = None if gold_rows is None else gold_rows.to(self.device)
        comparable = r.top_p == 1.0 and r.top_k == 0 and STUDENT in groups

        def loss_fn(h_s, w_s):
            stats = torch.zeros(len(SOURCES) * 3 + 1, device=self.device)
            by_source = stats[:-1].view(len(SOURCES), 3)
            gap, loss = torch.zeros((), device=self.device), None
            if lc.kind == "sampled_rkl":  # the student's samples only (the config refuses student_fraction < 1)
                rows = groups[STUDENT]
                loss, sampled_stats = chunked_sampled_rkl(
                    _rows(h_s, rows), w_s, _rows(sampled_ids, rows), _rows(part.token_logprobs, rows),
                    _rows(sampled_logprobs, rows), torch.ones(len(_rows(sampled_ids, rows)), device=self.device),
                    num_tokens=num_tokens, temperature=lc.temperature, clip_ratio=lc.clip_ratio,
                    valid_vocab=self.vocab_size, chunk_size=lc.chunk_size)
                by_source[STUDENT], gap = sampled_stats[:3], sampled_stats[3]
            else:
                for source, rows in groups.items():
                    part_loss, by_source[source] = self._divergence(_rows(h_s, rows), w_s,
                                                                    _rows(part.hidden_states, rows), num_tokens)
                    loss = part_loss if loss is None else loss + part_loss
                if comparable:
                    rows = groups[STUDENT]
                    learner_logprobs = chunked_token_logprobs(_rows(h_s.detach(), rows), w_s.detach(),
                                                              _rows(sampled_ids, rows), temperature=r.temperature,
                                                              valid_vocab=self.vocab_size)
                    gap = (learner_logprobs - _rows(sampled_logprobs, rows)).abs().max()
            if gold_rows is not None:  # the hybrid's gold prefix: cross-entropy, at temperature 1
                ce, nll = chunked_cross_entropy(h_s[gold_rows], w_s, sampled_ids[gold_rows],
                                                torch.ones(len(gold_rows), device=self.device), num_tokens=num_tokens,
                                                valid_vocab=self.vocab_size, chunk_size=lc.chunk_size)
                loss, stats[-1] = loss + lc.sft_weight * ce, nll[0]
            return loss, stats, gap

        return self._forward(packed, loss_fn)

    def _divergence(self, h_s: torch.Tensor, w_s: torch.Tensor, h_t: torch.Tensor, num_tokens: int):
        """The full-vocabulary divergence of student states `h_s` to the teacher's states `h_t` at the same
        response tokens, normalised by the step's `num_tokens`; with its detached stats."""
        lc = self.cfg.loss
        # the teacher's states arrive in its serving dtype; the kernel widens them one chunk at a time
        return chunked_divergence(
            h_s, w_s, h_t, self.teacher_head.weight, torch.ones(h_s.shape[0], device=self.device),
            kind=lc.kind, beta=lc.beta, temperature=lc.temperature, valid_vocab=self.vocab_size,
            num_tokens=num_tokens, chunk_size=lc.chunk_size,
            operand_dtype=torch.bfloat16 if self.autocast else torch.float32)

    def train_step(self, batch: RolloutBatch, parts: Sequence[TeacherScores]) -> dict[str, float]:
        """One optimizer step on `batch`; `parts`: the teacher's TeacherScores (or refs to them) of each
        micro-batch of the plan, in order (TeacherActor.score).

        The batch goes through the student in micro-batches of at most `learner.micro_batch_tokens` packed
        tokens; each one's backward adds its share to the gradients, so the step's loss and gradient are those
        of the whole batch while memory follows the budget. With several replicas each takes its share of the
        micro-batches and FSDP sums their gradients: the same step."""
        assert self.teacher_head is not None, "set_teacher_head before train_step"
        start = time.perf_counter()
        batch.check()
        # On-policy contract: the engine sampled with the weights this learner holds now (with run.overlap, with
        # the weights of one step before).
        # Off-policy samples (rollout.student_fraction < 1) carry no policy version: the check is the student's.
        lag = self.version - batch.policy_version if batch.on_policy else 0
        if not 0 <= lag <= int(self.cfg.run.overlap):
            raise RuntimeError(f"batch sampled by policy {batch.policy_version}, learner is at {self.version}")
        self.optimizer.zero_grad(set_to_none=True)
        packs = self._plan(batch, parts)
        loss, loss_metrics = self._forward_backward(batch, packs, parts)
        backward_done = _synchronized(loss)
        grad_norm = data_parallel.replicated(
            torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.cfg.learner.max_grad_norm))
        finite = bool(torch.isfinite(grad_norm)) and bool(torch.isfinite(loss))  # host sync; the same on every replica
        if finite:
            self.optimizer.step()  # one learner, cpu mode: writes the shared buffer in place, the engine sees it
            self.scheduler.step()
            self.version += 1
            self._check_weights_finite(float(grad_norm))
        # the gradients go until the next step's first backward: the rollout and the teacher (colocated: on the
        # same GPU) get their memory back
        self.optimizer.zero_grad(set_to_none=True)
        optimizer_done = _synchronized(loss)  # clipping and the step
        return_cached_memory(self.cfg, self.device)  # colocated: activations and loss blocks back to the GPU
        lens = batch.response_lens.float()
        return {
            "loss": float(loss),
            **loss_metrics,
            "grad/norm": float(grad_norm),
            "step/skipped": float(not finite),
            "lr": self.scheduler.get_last_lr()[0],
            "response/length/mean": float(lens.mean()),
            "response/length/max": float(lens.max()),
            "response/stop/fraction": sum(f == "stop" for f in batch.finish_reasons) / batch.num_samples,
            "response/tokens/sum": float(batch.num_response_tokens),
            "learner/micro_batches": float(len(packs)),
            "padding/waste_fraction": padding_waste(packs, self.cfg.learner.micro_batch_tokens),
            "timing/learner_s": time.perf_counter() - start,
            "timing/learner_forward_backward_s": backward_done - start,
            "timing/optimizer_s": optimizer_done - backward_done,
            "policy/version": float(self.version),
            "sync/policy_lag": float(lag),
            **self._optimizer_memory(),
        }

    def _optimizer_memory(self) -> dict[str, float]:
        """The optimizer state's bytes: the most one replica holds, and all replicas' together."""
        held = float(data_parallel.optimizer_state_bytes(self.optimizer))
        most = data_parallel.all_reduce(torch.tensor([held], device=self.device), "max")
        total = data_parallel.all_reduce(torch.tensor([held], device=self.device), "sum")
        return {"memory/optimizer_state_bytes/replica_max": float(most[0]),
                "memory/optimizer_state_bytes/total": float(total[0])}

    def _check_weights_finite(self, grad_norm: float) -> None:
        """A finite loss and gradient can still step to non-finite weights (an overflowing update): the engine
        would sample from them next. One read of the weights (this replica's shards) per step, one host sync."""
        norms = torch._foreach_norm([data_parallel.local(p.detach()) for p in self.student.parameters()])
        bad = data_parallel.all_reduce((~torch.isfinite(torch.stack(norms))).any().float().view(1), "max")
        if bool(bad[0]):
            raise RuntimeError(f"optimizer step {self.version} made the student's weights non-finite (gradient norm "
                               f"{grad_norm:.3g}, learner.lr={self.cfg.learner.lr:g}): lower learner.lr")

    def _forward_backward(self, batch: RolloutBatch, packs: list[PackedRows], parts: Sequence):
        """This replica's micro-batches' losses and backwards (the gradients accumulate); the step's loss and its
        metrics over every replica's (by sample source too, when the step mixes sources)."""
        n, sampled = batch.num_response_tokens, self.cfg.loss.kind == "sampled_rkl"
        # the loss, each source's stats' sums, the gold tokens' negative log-likelihood
        sums = torch.zeros(2 + 3 * len(SOURCES), device=self.device)
        gap = torch.zeros(1, device=self.device)
        for k in data_parallel.share(len(packs), self.rank, self.world):
            if k is None:  # another replica has one more micro-batch: join its collectives
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                    data_parallel.empty_pass(self.student, self.pad_id, self.device, backward=True)
                continue
            part, part_stats, part_gap = self._micro_batch_loss(packs[k], batch,
                                                                self._part(batch, packs[k], k, parts), n)
            part.backward()  # this micro-batch's activations are freed here; its gradient share stays
            sums += torch.cat([part.detach().view(1), part_stats])
            gap = torch.maximum(gap, part_gap.detach().view(1))
        data_parallel.all_reduce(sums)
        loss, by_source, nll = sums[0], sums[1:-1].view(len(SOURCES), 3), sums[-1]
        gap = data_parallel.all_reduce(gap, "max")[0]
        metrics = loss_metrics(batch, by_source, float(nll), sampled=sampled, cfg=self.cfg)
        comparable = self.cfg.rollout.top_p == 1.0 and self.cfg.rollout.top_k == 0 and batch.on_policy
        return loss, {**metrics, "logprob/learner_minus_rollout/absmax": float(gap) if comparable else float("nan")}

    @torch.no_grad()
    def evaluate(self, batch: RolloutBatch, parts: Sequence[TeacherScores]) -> dict[str, float]:
        """Exact full-vocabulary KL between student and teacher on `batch` (no update), micro-batch by
        micro-batch as in a step (`parts` as in `train_step`; each replica its share)."""
        packs = self._plan(batch, parts)
        self.student.eval()
        n = batch.num_response_tokens
        stats = torch.zeros(3, device=self.device)
        try:
            for k in data_parallel.share(len(packs), self.rank, self.world):
                if k is None:
                    data_parallel.empty_pass(self.student, self.pad_id, self.device, backward=False)
                    continue
                part = self._part(batch, packs[k], k, parts)
                stats += self._forward(packs[k], lambda h_s, w_s: self._divergence(h_s, w_s, part.hidden_states, n))[1]
            data_parallel.all_reduce(stats)
        finally:
            self.student.train()
            return_cached_memory(self.cfg, self.device)
        return {"kl/forward/mean": float(stats[0]) / n, "kl/reverse/mean": float(stats[1]) / n,
                "entropy/student/mean": float(stats[2]) / n,
                "response/length/mean": float(batch.response_lens.float().mean())}

    def save_checkpoint(self, path: str, run_state: dict) -> str:
        """An atomic checkpoint at `path` (opd/checkpoint.py): the student in Hugging Face format with its
        tokenizer, the optimizer / scheduler / RNG state, and the driver's `run_state`; then older ones are pruned.
        Several replicas: every one calls this at once; rank 0 writes the checkpoint, the others their shards
        into it (`_fill`)."""
        if self.rank > 0:
            self._fill(None)
            return path
        checkpoint.write(Path(path), self._fill, {**run_state, "policy_version": self.version})
        checkpoint.prune(Path(path).parent.parent, keep=self.cfg.train.keep_checkpoints)
        return path

    def _fill(self, tmp: Path | None) -> None:
        """The learner's files in the checkpoint's temporary folder `tmp` (rank 0's; the others are told it)."""
        source = model_source(self.cfg.model.student)
        if self.world == 1:
            checkpoint.save_learner(tmp, self.model, self.optimizer, self.scheduler, version=self.version,
                                    tokenizer_source=source)
            return
        tmp = Path(data_parallel.broadcast_object(str(tmp) if tmp is not None else None))
        checkpoint.save_sharded(tmp, self.student, self.optimizer, self.scheduler, version=self.version,
                                tokenizer_source=source, rank=self.rank, replicas=self.world)
        data_parallel.barrier()  # every replica's shards are written before rank 0 seals the checkpoint

    def load_checkpoint(self, path: str) -> int:
        """Restore a checkpoint into the live parameters (in place: cpu mode's engine maps them; the serving copy
        is refreshed from them at the next export). Returns the restored policy version. Several replicas:
        every one calls this at once."""
        if self.world == 1:
            self.version = checkpoint.load_learner(Path(path), self.model, self.optimizer, self.scheduler)
        else:
            self.version = checkpoint.load_sharded(Path(path), self.student, self.optimizer, self.scheduler,
                                                   rank=self.rank, replicas=self.world)
        return self.version

    def shutdown(self) -> None:
        self.weights.release()


def _rows(t: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    return t if rows is None else t[rows]


def _synchronized(t: torch.Tensor) -> float:
    """The time once the device's queued kernels have run (timing on a GPU)."""
    if t.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter()
