"""The production rollout engine on GPU: a thin adapter from the engine protocol to `sglang.Engine`.

It follows the engine protocol every engine implements (see `hf.py`, the reference): `generate`,
`load_weights`, `weight_version`, `release_memory`, `resume_memory`. The sglang engine object is injected, so
tests drive this adapter with a fake on CPU; `from_config` builds the real one and is the only place that
imports sglang (its engine does not import without a GPU).

Every call into sglang goes through `SGLANG_CALLS`, the table of methods and the exact keywords this adapter
passes; `tests/test_sglang_adapter.py` checks the table against the installed sglang's source (read with `ast`).
Checked against sglang 0.5.23.

Semantics that differ from `HFEngine`, on purpose or by sglang's design:
- log-probs are those of softmax(logits / T) over the whole vocabulary: sglang does not renormalise them after
  top-k / top-p truncation (HFEngine does). Equal when top_k = 0 and top_p = 1, the setting OPD uses.
- sglang also stops at the model's own end-of-sequence ids (its generation config), not only at `eos_id`.
- `seed` takes effect only in deterministic mode (`enable_deterministic_inference`); sample i of the flat
  batch gets `sampling_seed = seed + i`, so the repeats of one prompt differ.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from opd.batch import FINISH_REASONS, RolloutBatch
from opd.transport.sglang_weights import Bucket, DistributedUpdate, TensorBucketUpdate, encode_flattened_bucket

# method -> the keywords this adapter passes to it (and no others): the contract with sglang's Engine
SGLANG_CALLS: dict[str, frozenset[str]] = {
    "generate": frozenset({"input_ids", "sampling_params", "return_logprob"}),
    # sglang 0.5.23 refuses tensor and distributed updates outside a begin/end weight-update session
    "begin_weight_update": frozenset(),
    "update_weights_from_tensor": frozenset({"named_tensors", "load_format", "flush_cache"}),
    "update_weights_from_distributed": frozenset({"names", "dtypes", "shapes", "group_name", "flush_cache",
                                                  "load_format"}),
    "end_weight_update": frozenset(),
    "init_weights_update_group": frozenset({"master_address", "master_port", "rank_offset", "world_size",
                                            "group_name", "backend"}),
    "destroy_weights_update_group": frozenset({"group_name"}),
    "flush_cache": frozenset(),  # .success once the scheduler is idle (nothing running, no last batch)
    "release_memory_occupation": frozenset({"tags"}),
    "resume_memory_occupation": frozenset({"tags"}),
    "shutdown": frozenset(),
}
# keys of sglang's SamplingParams this adapter sets (sglang/srt/sampling/sampling_params.py)
SAMPLING_KEYS = frozenset({"max_new_tokens", "temperature", "top_p", "top_k", "stop_token_ids", "no_stop_trim",
                           "sampling_seed", "ignore_eos", "logit_bias"})
# the bias that masks a token: sglang adds logit_bias to the logits before it samples and computes log-probs, so
# the end-of-sequence id masked under ignore_eos is masked in the log-probs too, as HFEngine masks it. Finite: a
# -inf would give NaN in sglang's penalty arithmetic; -1e9 underflows exp() to 0 in fp32 and bf16 alike.
MASK_BIAS = -1e9
FLUSH_TRIES = 200  # flush_cache before a release: each try waits ~FLUSH_WAIT_S for the scheduler to go idle
FLUSH_WAIT_S = 0.05
CPU_KV_TOKENS = 65536  # device="cpu": sglang's KV pool in tokens (a GPU sizes it from mem_fraction_static)
MEMORY_TAGS = ("weights", "kv_cache", "cuda_graph")  # sglang/srt/constants.py; resume in this order


def engine_kwargs(model_path: str, *, mem_fraction_static: float, dtype: str = "bfloat16",
                  deterministic: bool = False, random_seed: int | None = None,
                  device: str = "cuda", gpu_id: int = 0) -> dict[str, Any]:
    """The sglang server arguments `SGLangEngine.from_config` sets (tests check each is a ServerArgs field).

    A folder without weight files (the benchmark's random-weight shape folders) starts with `load_format="dummy"`:
    sglang would refuse it ("Cannot find any model weights"); the first sync brings the learner's weights.
    `device="cpu"` (tests, run.device=cpu): fp32, the torch_native attention backend, a KV pool of
    CPU_KV_TOKENS tokens and no memory saver (torch_memory_saver needs libcuda; releases then free nothing).
    `gpu_id`: the CUDA index of the actor's GPU (not 0 under RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES)."""
    if not 0.0 < mem_fraction_static < 1.0:
        raise ValueError(f"mem_fraction_static={mem_fraction_static}: the fraction of GPU memory sglang may hold "
                         "for weights and KV cache, in (0, 1); leave room for the learner and teacher")
    kwargs = dict(model_path=model_path, dtype=dtype, tp_size=1, mem_fraction_static=mem_fraction_static,
                  enable_memory_saver=True,  # release_memory_occupation / resume_memory_occupation need it
                  skip_tokenizer_init=True,  # token ids in, token ids out: nothing is decoded
                  enable_deterministic_inference=deterministic, random_seed=random_seed)
    if not has_weight_files(model_path):
        kwargs["load_format"] = "dummy"
    if device == "cpu":
        kwargs.update(device="cpu", dtype="float32", attention_backend="torch_native", max_total_tokens=CPU_KV_TOKENS,
                      enable_memory_saver=False)
    elif device == "cuda":
        kwargs["base_gpu_id"] = gpu_id
    else:
        raise ValueError(f"device={device!r}: sglang runs here on 'cuda' or 'cpu'")
    return kwargs


def has_weight_files(model_path: str) -> bool:
    """Whether a local model folder holds weights sglang can load (a hub name is assumed to)."""
    folder = Path(model_path)
    if not folder.is_dir():
        return True
    return any(any(folder.glob(pattern)) for pattern in ("*.safetensors", "*.bin", "*.pt", "*.gguf"))


# ---------------------------------------------------------------- the engine


@dataclass
class _MemoryState:
    released: set[str] = field(default_factory=set)
    weights_lost: bool = False  # weights were released without a CPU backup and not reloaded since


class SGLangEngine:
    """The engine protocol around an `sglang.Engine` (or a fake with the same methods).

    Memory (colocated mode; needs `enable_memory_saver`). The order that works (slime):

        generate -> release_memory()                  # all: weights, kv_cache, cuda_graph
        (teacher scores, learner trains)
        -> resume_memory(["weights"]) -> load_weights(update)     # weights back, then the new values
        -> resume_memory(["kv_cache", "cuda_graph"]) -> generate

    `resume_memory()` with no tags resumes everything released, which is also correct (the KV cache is then
    already resident during the sync: a higher peak). Released weights are not kept (no CPU backup), so after
    they are resumed the engine refuses to generate until `load_weights` has run.
    """

    def __init__(self, engine: Any, *, eos_id: int, tp_size: int = 1, deterministic: bool = False,
                 weights_cpu_backup: bool = False, releases_memory: bool = True,
                 encode_bucket: Callable[[Sequence[tuple[str, torch.Tensor]], int], list[bytes]] | None = None):
        self.engine, self.eos_id, self.tp_size = engine, eos_id, tp_size
        self.deterministic, self.weights_cpu_backup = deterministic, weights_cpu_backup
        # False on the CPU: sglang's release ends in the accelerator's synchronize(), torch.cuda's with the CUDA
        # build sglang pins, which kills its scheduler on a machine without a GPU; and nothing would be freed.
        # Releases and resumes are then checked and ordered as on a GPU, and wait for an idle scheduler, but
        # not sent.
        self.releases_memory = releases_memory
        self.encode_bucket = encode_bucket or encode_flattened_bucket
        self._version = -1  # no weights published yet
        self._memory = _MemoryState()
        self._warned_seed = False

    @classmethod
    def from_config(cls, model_path: str, *, eos_id: int, mem_fraction_static: float, dtype: str = "bfloat16",
                    deterministic: bool = False, random_seed: int | None = None, device: str = "cuda",
                    gpu_id: int = 0, extra_server_args: dict[str, Any] | None = None) -> "SGLangEngine":
        """Start a real sglang engine on this process's GPU (tensor parallel size 1), or on the CPU with
        `device="cpu"` (sglang's CPU engine; needs an importable `sgl_kernel`, see tests/sglang_cpu)."""
        if os.environ.get("SGLANG_RETURN_ORIGINAL_LOGPROB", "").lower() in ("1", "true", "yes"):
            raise ValueError("SGLANG_RETURN_ORIGINAL_LOGPROB is set: sglang would return log-probs before the "
                             "temperature, not those it sampled from; unset it")
        kwargs = engine_kwargs(model_path, mem_fraction_static=mem_fraction_static, dtype=dtype,
                               deterministic=deterministic, random_seed=random_seed, device=device, gpu_id=gpu_id)
        extra = dict(extra_server_args or {})
        if clash := sorted(set(extra) & set(kwargs)):
            raise ValueError(f"extra_server_args {clash} are set by from_config itself: pass them as its arguments")
        if device == "cpu":
            os.environ["SGLANG_USE_CPU_ENGINE"] = "1"  # read at sglang's import, in this process and its children
        import sglang  # only here: sglang's engine imports on a GPU, or on the CPU as above

        engine = sglang.Engine(**kwargs, **extra)
        return cls(engine, eos_id=eos_id, tp_size=1, deterministic=deterministic,
                   weights_cpu_backup=bool(extra.get("enable_weights_cpu_backup", False)),
                   releases_memory=device != "cpu")

    def _call(self, method: str, **kwargs: Any) -> Any:
        assert set(kwargs) == SGLANG_CALLS[method], f"{method}: passes {sorted(kwargs)}, the table says " \
                                                    f"{sorted(SGLANG_CALLS[method])}"
        return getattr(self.engine, method)(**kwargs)

    @staticmethod
    def _check(result: Any, what: str) -> None:
        # sglang's control calls return (success, message); a failure is not raised on its side.
        success, message = result
        if not success:
            raise RuntimeError(f"sglang {what} failed: {message}")

    # ------------------------------------------------------------ protocol

    def weight_version(self) -> int:
        return self._version

    def load_weights(self, update: TensorBucketUpdate | DistributedUpdate) -> int:
        """Apply one sync; the version changes only after every sglang call returned successfully."""
        if "weights" in self._memory.released:
            raise RuntimeError("load_weights while the engine's weights are released: resume_memory(['weights']) "
                               "first")
        if not isinstance(update, (TensorBucketUpdate, DistributedUpdate)):
            raise TypeError(f"SGLangEngine.load_weights takes a TensorBucketUpdate or DistributedUpdate, "
                            f"not {type(update).__name__}")
        self._check(self._call("begin_weight_update"), "begin_weight_update")
        try:
            if isinstance(update, TensorBucketUpdate):
                num_buckets = len(update.buckets)
                for i, bucket in enumerate(update.buckets):
                    # flush the radix cache once, after the last bucket: earlier flushes are wasted work
                    result = self._call("update_weights_from_tensor", named_tensors=self._payload(bucket, update),
                                        load_format=update.load_format, flush_cache=i == num_buckets - 1)
                    self._check(result, f"update_weights_from_tensor (bucket {i + 1} of {num_buckets})")
            else:
                calls = update.calls()
                for i, part in enumerate(calls):  # the learner broadcasts the same buckets in the same order
                    result = self._call("update_weights_from_distributed", names=list(update.names[part]),
                                        dtypes=[_dtype_name(d) for d in update.dtypes[part]],
                                        shapes=[list(s) for s in update.shapes[part]], group_name=update.group_name,
                                        flush_cache=i == len(calls) - 1, load_format=update.load_format)
                    self._check(result, f"update_weights_from_distributed (bucket {i + 1} of {len(calls)})")
        finally:
            ended = self._call("end_weight_update")  # close the session even when a bucket failed
        self._check(ended, "end_weight_update")
        self._version = update.version
        self._memory.weights_lost = False
        return self._version

    def _payload(self, bucket: Bucket, update: TensorBucketUpdate) -> list:
        if update.load_format != "flattened_bucket":
            return [(name, tensor) for name, tensor in bucket]  # sglang serialises these once per TP rank
        if all(isinstance(item, (bytes, str)) for item in bucket):  # serialised by the producer
            if len(bucket) != self.tp_size:
                raise ValueError(f"a serialised bucket needs one payload per TP rank: {len(bucket)} for "
                                 f"tp_size {self.tp_size}")
            return list(bucket)
        return self.encode_bucket(bucket, self.tp_size)

    def init_weights_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int,
                           group_name: str, backend: str = "nccl") -> None:
        """Join the learner's broadcast group (split mode); the learner joins as rank 0 at the same time."""
        result = self._call("init_weights_update_group", master_address=master_address, master_port=master_port,
                            rank_offset=rank_offset, world_size=world_size, group_name=group_name, backend=backend)
        self._check(result, "init_weights_update_group")

    def release_memory(self, tags: Sequence[str] | None = None) -> None:
        """Release GPU memory (default: all of weights, kv_cache, cuda_graph). Only while nothing generates."""
        todo = [t for t in _tags(tags) if t not in self._memory.released]
        if not todo:
            return
        self._wait_idle()
        if self.releases_memory:
            self._call("release_memory_occupation", tags=todo)
        self._memory.released.update(todo)
        if "weights" in todo and not self.weights_cpu_backup:
            self._memory.weights_lost = True

    def _wait_idle(self) -> None:
        # sglang asserts its scheduler is idle on a release, its last batch included, which it may not yet be
        # right after the last output; flush_cache succeeds only once it is (what slime does before a release)
        for _ in range(FLUSH_TRIES):
            if self._call("flush_cache").success:  # sglang's FlushCacheReqOutput
                return
            time.sleep(FLUSH_WAIT_S)
        raise RuntimeError(f"sglang's scheduler did not go idle in {FLUSH_TRIES * FLUSH_WAIT_S:.0f} s (flush_cache "
                           "kept failing): a request is still running, so its memory cannot be released")

    def resume_memory(self, tags: Sequence[str] | None = None) -> None:
        """Take memory back (default: everything released, weights first)."""
        todo = [t for t in _tags(tags) if t in self._memory.released]
        if not todo:
            return
        if self.releases_memory:
            self._call("resume_memory_occupation", tags=todo)
        self._memory.released.difference_update(todo)

    def shutdown(self) -> None:
        self._call("shutdown")

    def generate(self, prompts: list[list[int]], *, num_samples: int = 1, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 0, max_new_tokens: int, greedy: bool = False,
                 seed: int | None = None, ignore_eos: bool = False) -> RolloutBatch:
        """Sample `num_samples` responses per prompt (token ids in, token ids out); see the module docstring
        for how sglang's log-probs and stops relate to HFEngine's. `ignore_eos`: every response runs to
        `max_new_tokens` (sglang then checks no stop token at all; benchmarks)."""
        if self._memory.released:
            raise RuntimeError(f"generate while {sorted(self._memory.released)} are released: resume_memory first")
        if self._memory.weights_lost:
            raise RuntimeError("generate after the weights were released and resumed without a load_weights: "
                               "the engine's weights are undefined")
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("generate needs at least one prompt, each with at least one token")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens}: a response has at least one token")
        if top_k < 0:
            raise ValueError(f"top_k={top_k}: use 0 for no top-k truncation")
        if not greedy and temperature <= 0:
            raise ValueError(f"temperature={temperature}: sample with temperature > 0, or pass greedy=True")
        flat = [list(p) for p in prompts for _ in range(num_samples)]
        params = [self._sampling_params(i, temperature=temperature, top_p=top_p, top_k=top_k,
                                        max_new_tokens=max_new_tokens, greedy=greedy, seed=seed,
                                        ignore_eos=ignore_eos)
                  for i in range(len(flat))]
        outputs = self._call("generate", input_ids=flat, sampling_params=params, return_logprob=True)
        # a batch of input_ids (a list of lists) gives a list of outputs, in input order
        assert isinstance(outputs, list) and len(outputs) == len(flat), \
            f"sglang returned {type(outputs).__name__} of {len(outputs)} outputs for {len(flat)} inputs"

        responses, logprobs, reasons = [], [], []
        for i, out in enumerate(outputs):
            ids, lps, reason = self._read_output(i, out, max_new_tokens)
            responses.append(ids)
            logprobs.append(lps)
            reasons.append(reason)
        return RolloutBatch.from_lists(flat, responses, logprobs,
                                       prompt_index=torch.arange(len(prompts)).repeat_interleave(num_samples),
                                       finish_reasons=reasons, policy_version=self._version)

    def _sampling_params(self, i: int, *, temperature: float, top_p: float, top_k: int, max_new_tokens: int,
                         greedy: bool, seed: int | None, ignore_eos: bool = False) -> dict[str, Any]:
        params = dict(
            max_new_tokens=max_new_tokens,
            # sglang: temperature 0 means greedy (it sets top_k = 1); top_k -1 means the whole vocabulary
            temperature=0.0 if greedy else temperature,
            top_p=1.0 if greedy else top_p,
            top_k=-1 if greedy or top_k == 0 else top_k,
            stop_token_ids=[self.eos_id],
            no_stop_trim=True,  # keep the end-of-sequence id in output_ids: responses end at and include it
        )
        if seed is not None and not greedy:
            if self.deterministic:
                params["sampling_seed"] = seed + i  # distinct per sample: repeats of a prompt must differ
            elif not self._warned_seed:
                self._warned_seed = True
                warnings.warn("SGLangEngine.generate: seed is ignored; sglang seeds sampling only with "
                              "enable_deterministic_inference (from_config(deterministic=True))", stacklevel=3)
        if ignore_eos:
            # sglang checks no stop at all under ignore_eos, and does not mask the id either: mask it here
            params.update(ignore_eos=True, logit_bias={str(self.eos_id): MASK_BIAS})
        assert set(params) <= SAMPLING_KEYS
        return params

    def _read_output(self, i: int, out: dict, max_new_tokens: int) -> tuple[list[int], list[float], str]:
        ids = [int(t) for t in out["output_ids"]]
        meta = out["meta_info"]
        finish = meta["finish_reason"]  # {"type": "stop", "matched": id} | {"type": "length", "length": n} | ...
        reason = finish["type"] if finish else None
        if reason not in FINISH_REASONS:
            raise RuntimeError(f"sglang finished sample {i} with {finish!r}")
        if reason == "stop" and not isinstance(finish.get("matched"), int):
            # no stop strings are set: a string match is sglang's NaN guard ("NaN happened")
            raise RuntimeError(f"sglang stopped sample {i} on {finish.get('matched')!r}, not on a token")
        entries = meta["output_token_logprobs"]  # [(logprob, token_id, text or None)] per output token
        entry_ids = [int(e[1]) for e in entries]
        assert entry_ids == ids, (f"sample {i}: sglang's output_ids {ids} and the token ids of its "
                                  f"output_token_logprobs {entry_ids} differ (stop token trimmed?)")
        assert 1 <= len(ids) <= max_new_tokens, f"sample {i}: {len(ids)} tokens for max_new_tokens {max_new_tokens}"
        assert self.eos_id not in ids[:-1], f"sample {i}: generation went on past the end-of-sequence id"
        lps = [float(e[0]) for e in entries]
        assert all(math.isfinite(lp) for lp in lps), f"sample {i}: non-finite log-probs {lps}"
        return ids, lps, reason


def _tags(tags: Sequence[str] | None) -> list[str]:
    tags = MEMORY_TAGS if tags is None else tuple(tags)
    if unknown := sorted(set(tags) - set(MEMORY_TAGS)):
        raise ValueError(f"memory tags {unknown}: sglang knows {list(MEMORY_TAGS)}")
    return [t for t in MEMORY_TAGS if t in tags]  # canonical order: weights first


def _dtype_name(dtype: str | torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if not isinstance(getattr(torch, name, None), torch.dtype):
        raise ValueError(f"DistributedUpdate.dtypes: {dtype!r} is not a torch dtype name")
    return name
