"""What each mode is: whether it runs on GPUs, how many it needs, how the teacher's states travel; and the check
that this machine can run it. Plain facts of the config, read by the actors, the memory plan and preflight (the
placement of actors on a Ray cluster is opd/cluster/placement.py's)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from opd.config import Config, ConfigError


def uses_gpus(cfg: Config) -> bool:
    """A GPU mode on its GPUs (run.device=cpu runs a GPU mode's plumbing on the CPU)."""
    return cfg.run.mode != "cpu" and cfg.run.device == "auto"


def gpus_needed(cfg: Config) -> int:
    """colocated: run.gpus, each holding one of every actor; split: the learner's GPU plus one per rollout/teacher
    pair."""
    r = cfg.run
    return {"cpu": 0, "colocated": r.gpus, "split": 1 + max(r.rollout_replicas, r.teacher_replicas)}[r.mode]


def hidden_transport(cfg: Config) -> str:
    """How the teacher's hidden states reach the learner: Ray's object store (cpu), a CUDA IPC handle (same GPU;
    a shared-memory file with run.device=cpu), a collective send/recv (NCCL across GPUs; gloo on CPU)."""
    return {"cpu": "object_store", "colocated": "ipc", "split": "collective"}[cfg.run.mode]


def weight_route(cfg: Config):
    """How the learner's weights reach the engines (opd/transport/weights.py), decided here once from mode, engine
    and replicas: cpu, one learner: the engine maps its fp32 master weights; cpu with sharded learners and
    colocated with hf: the engine maps a serving buffer; colocated with sglang: CUDA IPC buckets; split: a
    broadcast (into sglang's own group with sglang)."""
    import torch

    from opd.models import DTYPES
    from opd.transport import weights

    r, sglang, dtype = cfg.run, cfg.rollout.engine == "sglang", DTYPES[cfg.model.dtype]
    if r.mode == "split":
        return weights.SGLangBroadcastRoute(dtype) if sglang else weights.BroadcastRoute(dtype)
    if r.mode == "colocated":
        return weights.SGLangIPCRoute(dtype) if sglang else weights.MappedServingRoute(dtype)
    return weights.SharedMasterRoute() if r.learner_replicas == 1 else weights.MappedServingRoute(torch.float32)


def state_outbox(cfg: Config, rank: int = -1):
    """The teacher's side of `hidden_transport`, chosen here once (opd/transport/hidden_states.py); `rank`: the
    teacher's rank in the hidden-states group (split mode)."""
    from opd.transport import hidden_states

    kind = hidden_transport(cfg)
    if kind == "collective":
        return hidden_states.CollectiveOutbox(rank)
    return hidden_states.IPCOutbox() if kind == "ipc" else hidden_states.ObjectStoreOutbox()


# NVIDIA's minor-version compatibility: a torch built for CUDA <major>.x needs at least this kernel driver branch
MIN_DRIVER = {13: 580, 12: 525, 11: 450}
NVIDIA_PROC = Path("/proc/driver/nvidia")  # the kernel driver's own view: its version, one folder per GPU


@dataclass(frozen=True)
class CudaState:
    """What this machine offers torch: GPUs the NVIDIA driver lists, the driver, torch's CUDA build, and how many
    GPUs torch can use; `why` says, in one line with its fix, why that is none when there is any GPU or CUDA."""

    torch_cuda: str | None  # torch.version.cuda; None: a CPU build
    driver: str | None  # the kernel driver's version; None: no NVIDIA driver
    gpus_present: int
    usable: int
    why: str = ""

    @property
    def unusable(self) -> bool:
        """A GPU is there, but torch cannot use it (a CPU build, an old driver, hidden devices)."""
        return self.usable == 0 and self.gpus_present > 0


def cuda_state() -> CudaState:
    import warnings

    import torch

    with warnings.catch_warnings(record=True) as caught:  # torch says why CUDA is unavailable as a warning
        warnings.simplefilter("always")
        usable = torch.cuda.device_count() if torch.cuda.is_available() else 0
    driver, present = _nvidia_driver(), _nvidia_gpus()
    version, build = torch.__version__, torch.version.cuda
    if usable or not present:
        return CudaState(build, driver, present, usable)
    if build is None:
        why = (f"torch {version} is a CPU build and this machine has {present} NVIDIA GPU(s): install a CUDA build "
               f"(pip install -e '.[gpu]' brings torch 2.14.1 for CUDA 13)")
    elif driver and (need := MIN_DRIVER.get(int(build.split(".")[0]))) and int(driver.split(".")[0]) < need:
        why = (f"CUDA present but unusable: torch {version} is built for CUDA {build}, which needs NVIDIA driver "
               f">= {need}, and this machine's is {driver}: update the driver (or install a torch for an older CUDA)")
    else:
        said = next((str(w.message).strip().splitlines()[0] for w in caught), "torch.cuda.is_available() is False")
        hidden = " (CUDA_VISIBLE_DEVICES hides every GPU)" if os.environ.get("CUDA_VISIBLE_DEVICES") == "" else ""
        why = f"CUDA present but unusable{hidden}: {said}"
    return CudaState(build, driver, present, 0, why)


def _nvidia_driver() -> str | None:
    try:
        text = (NVIDIA_PROC / "version").read_text()
    except OSError:
        return None
    found = re.search(r"\s(\d{3,}\.\d+(?:\.\d+)?)\s", text)
    return found.group(1) if found else None


def _nvidia_gpus() -> int:
    try:
        return sum(1 for _ in (NVIDIA_PROC / "gpus").iterdir())
    except OSError:
        return 0


def check_cpus(cfg: Config) -> None:
    """A private Ray instance has this machine's CPUs: a placement that asks for more would wait for an autoscaler
    that never comes (120 s, then an error); refuse it now. A cluster's CPUs are the cluster's."""
    if cfg.run.ray_address or os.environ.get("RAY_ADDRESS"):
        return
    r = cfg.run
    actors = r.rollout_replicas + r.teacher_replicas + r.learner_replicas
    have = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if r.cpus_per_actor * actors > have:
        raise ConfigError(f"run.cpus_per_actor={r.cpus_per_actor:g} for {actors} actors asks for "
                          f"{r.cpus_per_actor * actors:g} CPUs, this machine has {have}: lower run.cpus_per_actor "
                          f"(it is Ray's scheduling share; run.threads_per_actor sets the threads)")


def check_devices(cfg: Config) -> None:
    """Refuse a mode this machine cannot run, before Ray starts."""
    if cfg.rollout.engine == "sglang":
        on_cpu = cfg.run.mode == "colocated" and cfg.run.device == "cpu"  # sglang's CPU engine (the tests)
        if not uses_gpus(cfg) and not on_cpu:
            raise ConfigError(f"rollout.engine=sglang needs --mode colocated or split on GPUs (or colocated with "
                              f"run.device=cpu), not run.mode={cfg.run.mode} with run.device={cfg.run.device}: use "
                              "rollout.engine=hf")
        import importlib.util

        if importlib.util.find_spec("sglang") is None:
            raise ConfigError("rollout.engine=sglang but sglang is not installed: pip install -e '.[gpu]' "
                              "(or use --set rollout.engine=hf)")
        if on_cpu and importlib.util.find_spec("sgl_kernel") is None:
            raise ConfigError("rollout.engine=sglang with run.device=cpu needs an importable sgl_kernel, which has no "
                              "CPU build on PyPI: put the tests' stand-in first on the path (PYTHONPATH=$PWD/tests/sglang_cpu: absolute, the actors start elsewhere)"
                              " or use --set rollout.engine=hf")
    if not uses_gpus(cfg):
        return
    needed, state = gpus_needed(cfg), cuda_state()
    # On a Ray cluster the GPUs are the cluster's, not this machine's: placement reports a shortfall there.
    if state.usable >= needed or cfg.run.ray_address or os.environ.get("RAY_ADDRESS"):
        return
    if state.unusable:
        raise ConfigError(f"run.mode={cfg.run.mode} needs {needed} GPU(s): {state.why}")
    fewer = " or lower run.gpus" if cfg.run.gpus > 1 else ""
    raise ConfigError(f"run.mode={cfg.run.mode} needs {needed} GPU(s), this machine has {state.usable}: use --mode "
                      f"cpu{fewer} (or --set run.device=cpu to run the mode's plumbing on the CPU)")
