"""Set-up every actor process does first."""

from __future__ import annotations

import os

import torch

from opd.config import Config
from opd.modes import uses_gpus
from opd.models import load_model, load_tokenizer, model_source, quiet_transformers

# sglang turns NCCL's cuMem allocator off in its processes unless NCCL_CUMEM_ENABLE is set (_set_envs_and_config in
# sglang/srt/entrypoints/engine.py); the members of one NCCL group must agree, or the learner's broadcast into
# sglang's weight group fails (p2p.cc "invalid argument"). So every actor starts with sglang's value (a user's wins).
NCCL_CUMEM_ENABLE = "0"
# set on a Ray cluster, Ray leaves CUDA_VISIBLE_DEVICES alone: an actor's GPU is then not cuda:0 (cuda_index)
NOSET_CUDA_ENV = "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"


def init_process(cfg: Config) -> None:
    """First thing in every actor's process, before any NCCL communicator exists."""
    # Two cores and three actors: one torch thread each keeps phases from fighting over the CPU.
    torch.set_num_threads(cfg.run.threads_per_actor)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("NCCL_CUMEM_ENABLE", NCCL_CUMEM_ENABLE)
    quiet_transformers()


def actor_device(cfg: Config) -> torch.device:
    """The device an actor computes on: in the GPU modes the GPU Ray assigned it (`cuda_index`; cuda:0 outside a
    Ray actor), made the current device (torch.distributed and NCCL allocate there), else the CPU."""
    if not uses_gpus(cfg):
        return torch.device("cpu")
    import ray

    in_actor = ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None
    index = cuda_index() if in_actor else 0
    if index:  # cuda:0 is current already
        torch.cuda.set_device(index)
    return torch.device("cuda", index)


def cuda_index() -> int:
    """This Ray actor's CUDA index of the GPU Ray assigned it, checked against what the process sees. Ray sets
    CUDA_VISIBLE_DEVICES to that GPU, so it is cuda:0; with RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES=1 (or true:
    Ray's reading, ray/_private/accelerators/nvidia_gpu.py) it does not, every GPU of the node stays visible, and
    the index is that of ray.get_gpu_ids()'s first id: the id itself, or its place in the CUDA_VISIBLE_DEVICES the
    node was started with (the ids are then that list's entries)."""
    import ray

    ids = [str(i) for i in ray.get_gpu_ids()]
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    shown = os.environ.get("CUDA_VISIBLE_DEVICES", "unset")
    if not ids:
        raise RuntimeError("Ray assigned this actor no GPU in a GPU mode: launch it with num_gpus > 0 (as "
                           "opd/cluster/topology.py does), or use run.mode=cpu")
    if os.environ.get(NOSET_CUDA_ENV, "").lower() not in ("1", "true"):
        if sorted(visible) != sorted(ids):
            raise RuntimeError(f"this actor sees CUDA_VISIBLE_DEVICES={shown}, Ray assigned it GPU {','.join(ids)}: "
                               f"do not set CUDA_VISIBLE_DEVICES for the actors (Ray does), or set {NOSET_CUDA_ENV}=1")
        return 0
    if visible and ids[0] not in visible:
        raise RuntimeError(f"{NOSET_CUDA_ENV} is set and Ray assigned GPU {ids[0]}, which CUDA_VISIBLE_DEVICES={shown} "
                           f"does not list: set the same CUDA_VISIBLE_DEVICES for Ray's node and its actors, or unset "
                           f"{NOSET_CUDA_ENV}")
    index = visible.index(ids[0]) if visible else int(ids[0])
    if index >= torch.cuda.device_count():
        raise RuntimeError(f"{NOSET_CUDA_ENV} is set and Ray assigned GPU {ids[0]} (cuda:{index}), but this actor "
                           f"sees {torch.cuda.device_count()} GPU(s) (CUDA_VISIBLE_DEVICES={shown}): unset "
                           f"{NOSET_CUDA_ENV}, or show the actors every GPU of the node")
    return index


def return_cached_memory(cfg: Config, device: torch.device) -> None:
    """colocated mode on a GPU: hand the blocks this phase freed back to the device (torch keeps them cached
    otherwise), so the next phase's actor on the same GPU can use them."""
    if cfg.run.mode == "colocated" and device.type == "cuda":
        torch.cuda.empty_cache()


def join_groups(self, spec, me: int) -> None:
    """split mode (an actor method): join the run's collective groups as global member `me`."""
    from opd.transport import groups

    groups.join(spec, me)


def special_ids(model_name: str) -> tuple[int, int, int]:
    """(eos id, pad id, tokenizer vocabulary size) of a model's tokenizer."""
    tokenizer = load_tokenizer(model_source(model_name))
    return tokenizer.eos_token_id, tokenizer.pad_token_id, len(tokenizer)


def load(cfg: Config, side: str, *, dtype: str | None = None):
    """The student or teacher model, in `dtype` (default: model.dtype) with the configured attention."""
    from opd import shapes

    source, dtype = model_source(getattr(cfg.model, side)), dtype or cfg.model.dtype
    attn_implementation = cfg.model.attn_implementation or None
    if shapes.is_random(source):  # a benchmark shape (opd/shapes.py): seeded random weights, nothing on disk
        from opd.models import DTYPES

        return shapes.random_model(source, dtype=DTYPES[dtype], attn_implementation=attn_implementation,
                                   seed=cfg.train.seed)
    return load_model(source, dtype=dtype, attn_implementation=attn_implementation)


def _rss_high_water_bytes() -> int:
    """Peak resident set size of this process (VmHWM, which `reset_peak_memory` can reset; getrusage's
    ru_maxrss where /proc is missing)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def memory_stats(self) -> dict:
    """Peak memory since the last `reset_peak_memory` (an actor method): CUDA allocator peak on a GPU, peak
    resident set size always; with the device's name (the benchmark's roofline looks it up)."""
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    return {"peak_rss_bytes": _rss_high_water_bytes(), "rss_bytes": _rss_bytes(),
            "peak_cuda_bytes": torch.cuda.max_memory_allocated() if cuda else None,
            "device": torch.cuda.get_device_name() if cuda else "cpu"}


def _rss_bytes() -> int:
    try:
        return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def reset_peak_memory(self) -> None:
    """Start a new peak (an actor method): the CUDA allocator's, and the RSS high-water mark (Linux: writing 5 to
    /proc/self/clear_refs resets it to the current RSS)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
