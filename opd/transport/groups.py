"""The split mode's collective groups, by name, inside each actor process.

Two groups: `opd-weights` (learner rank 0, rollout replica i rank 1 + i: the weight broadcast) and `opd-hidden`
(learner rank 0, teacher replica i rank 1 + i: hidden states by send/recv). The run's actors form one
torch.distributed world (rendezvous at the learner) and each group is a `new_group` of it, with ranks translated:
NCCL on GPUs, gloo for the split mode's plumbing on CPU — the same calls either way, so the CPU tests run the GPU
code path. NCCL is torch's own (the nvidia-nccl wheel torch depends on), not cupy's through `ray.util.collective`:
no second NCCL in the process, and nothing that fails only when the first collective runs. A group's communicator
is created at its first collective, and only the world is never used for one: rollout replica i and teacher
replica i share a GPU, which NCCL refuses inside one communicator, but they share no group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_GROUPS: dict[str, "Group"] = {}


@dataclass(frozen=True)
class GroupSpec:
    """Every group of the run by name, as global member indices (0 = learner), and their world."""

    groups: dict[str, tuple[int, ...]]
    world_size: int
    backend: str  # "nccl" | "gloo"
    init_method: str  # tcp://address:port of the learner's rendezvous


def free_endpoint() -> tuple[str, int]:
    """This node's address and a free port on it, for a torch.distributed rendezvous that rank 0 listens on."""
    import socket

    import ray

    with socket.socket() as sock:
        sock.bind(("", 0))  # free on every interface, as torch.distributed's rendezvous then listens
        return ray.util.get_node_ip_address(), sock.getsockname()[1]


class Group:
    """One logical group as this process sees it: ranks are the group's own (0 = learner)."""

    def __init__(self, name: str, members: tuple[int, ...], backend: str, process_group):
        self.name, self.members, self.backend, self.pg = name, members, backend, process_group

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> None:
        torch.distributed.broadcast(tensor, src=self.members[src], group=self.pg)

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        torch.distributed.send(tensor, dst=self.members[dst], group=self.pg)

    def recv(self, tensor: torch.Tensor, src: int) -> None:
        torch.distributed.recv(tensor, src=self.members[src], group=self.pg)


def join(spec: GroupSpec, me: int) -> None:
    """Join the run's world as global member `me`, and every group of `spec` it belongs to. All members call
    this at once (creating a group is collective over the world, each in the same order)."""
    if spec.backend == "nccl":
        if not torch.distributed.is_nccl_available():
            raise RuntimeError("split mode on GPUs needs NCCL, and this torch has none: install a CUDA build of "
                               "torch (pip install -e '.[gpu]'), check with python -m opd.programs.doctor --gpu")
        # no set_device here: the actor's GPU is its current device already (cuda:0, or with Ray's
        # RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES the index opd/actors/common.py actor_device set)
    torch.distributed.init_process_group(spec.backend, init_method=spec.init_method, world_size=spec.world_size,
                                         rank=me)
    for name, members in spec.groups.items():
        pg = torch.distributed.new_group(list(members), backend=spec.backend)
        if me in members:
            _GROUPS[name] = Group(name, members, spec.backend, pg)


def get(name: str) -> Group:
    if name not in _GROUPS:
        raise RuntimeError(f"collective group {name!r} was not joined in this process (split mode joins them at "
                           f"launch)")
    return _GROUPS[name]
