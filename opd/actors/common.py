"""Set-up every actor process does first."""

from __future__ import annotations

import os

import torch

from opd.config import Config
from opd.modes import uses_gpus
from opd.models import load_model, load_tokenizer, model_source, quiet_transformers


def init_process(cfg: Config) -> None:
    # Two cores and three actors: one torch thread each keeps phases from fighting over the CPU.
    torch.set_num_threads(cfg.run.threads_per_actor)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_transformers()


def actor_device(cfg: Config) -> torch.device:
    """The device an actor computes on: its GPU in the GPU modes (Ray sets CUDA_VISIBLE_DEVICES to the GPU of
    the actor's share, so it is always cuda:0 here), else the CPU."""
    return torch.device("cuda", 0) if uses_gpus(cfg) else torch.device("cpu")


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
