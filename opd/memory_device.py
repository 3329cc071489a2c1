"""What a memory plan is checked against: this machine's GPUs (one kind, memory per GPU) or its RAM.

`detect(cfg)` reads the GPUs from nvidia-smi (no CUDA context in the driver's process), else from torch; None
when a GPU mode's GPUs are a Ray cluster's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from opd.config import Config
from opd.modes import uses_gpus

GIB = 1 << 30


@dataclass(frozen=True)
class Device:
    """What the plan is checked against: GPUs of one kind (memory per GPU) or the machine's RAM."""

    kind: str  # "cuda" | "cpu"
    name: str
    total_bytes: int  # per GPU, or the machine's RAM
    count: int = 1

    @classmethod
    def gpu(cls, total_bytes: int, name: str = "GPU", count: int = 1) -> Device:
        return cls("cuda", name, int(total_bytes), count)

    @classmethod
    def cpu(cls, total_bytes: int | None = None) -> Device:
        return cls("cpu", "RAM", int(total_bytes if total_bytes is not None else ram_bytes()))


def ram_bytes() -> int:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def detect(cfg: Config) -> Device | None:
    """The device of this machine the config runs on; None when a GPU mode's GPUs are a Ray cluster's."""
    if not uses_gpus(cfg):
        return Device.cpu()
    gpus = _nvidia_smi()
    if not gpus:
        import torch

        if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
            return None  # the GPUs are elsewhere (ray_address): placement finds out
        props = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
        gpus = [(p.name, p.total_memory) for p in props]
    name, total = min(gpus, key=lambda g: g[1])  # the smallest, if they differ
    return Device.gpu(total, name, len(gpus))


def _nvidia_smi() -> list[tuple[str, int]]:
    """(name, total bytes) of the visible GPUs from nvidia-smi: no CUDA context in the driver's process, which
    would otherwise hold GPU memory for the whole run. Empty when nvidia-smi is missing or fails."""
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index,name,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
        rows = [[f.strip() for f in line.split(",")] for line in out.strip().splitlines()]
        gpus = {index: (name, int(float(mib)) << 20) for index, name, mib in rows}
    except (OSError, subprocess.SubprocessError, ValueError):
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and all(v.strip().isdigit() for v in visible.split(",") if v.strip()):
        return [gpus[v.strip()] for v in visible.split(",") if v.strip() in gpus]
    return list(gpus.values())
