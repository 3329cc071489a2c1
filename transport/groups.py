"""The split mode's collective groups, by name, inside each actor process.

Two groups: `opd-weights` (learner rank 0, rollout replica i rank 1 + i: the weight broadcast) and `opd-hidden`
(learner rank 0, teacher replica i rank 1 + i: hidden states by send/recv). On GPUs each is a
`ray.util.collective` NCCL group (cupy; one communicator per group, and no two ranks of a group share a GPU).
On CPU (the split mode's plumbing, tests) gloo stands in: Ray 2.60's gloo groups all live in one torch default
process group whose ranks are the first group's, so a process cannot be in two of them. There the actors form one
torch.distributed gloo world and each logical group is a `new_group` of it, with ranks translated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_GROUPS: dict[str, "Group"] = {}


@dataclass(frozen=True)
class GroupSpec:
    """Every group of the run by name, as global member indices (0 = learner), and the world for gloo."""

    groups: dict[str, tuple[int, ...]]
    world_size: int
    backend: str  # "nccl" | "gloo"
    init_method: str = ""  # gloo: tcp://address:port of the learner's rendezvous


class Group:
    """One logical group as this process sees it: ranks are the group's own (0 = learner)."""

    def __init__(self, name: str, members: tuple[int, ...], backend: str, process_group=None):
        self.name, self.members, self.backend, self.pg = name, members, backend, process_group

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> None:
        if self.pg is None:
            from ray.util import collective

            collective.broadcast(tensor, src_rank=src, group_name=self.name)
        else:
            torch.distributed.broadcast(tensor, src=self.members[src], group=self.pg)

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        if self.pg is None:
            from ray.util import collective

            collective.send(tensor, dst, self.name)
        else:
            torch.distributed.send(tensor, dst=self.members[dst], group=self.pg)

    def recv(self, tensor: torch.Tensor, src: int) -> None:
        if self.pg is None:
            from ray.util import collective

            collective.recv(tensor, src, self.name)
        else:
            torch.distributed.recv(tensor, src=self.members[src], group=self.pg)


def join(spec: GroupSpec, me: int) -> None:
    """Join every group of `spec` this member (global index `me`) belongs to. All members call this at once."""
    if spec.backend == "nccl":
        from ray.util import collective

        for name, members in spec.groups.items():
            if me in members:
                collective.init_collective_group(len(members), members.index(me), backend="nccl", group_name=name)
                _GROUPS[name] = Group(name, members, "nccl")
        return
    torch.distributed.init_process_group("gloo", init_method=spec.init_method, world_size=spec.world_size, rank=me)
    for name, members in spec.groups.items():  # every process creates every subgroup, in the same order
        pg = torch.distributed.new_group(list(members), backend="gloo")
        if me in members:
            _GROUPS[name] = Group(name, members, "gloo", pg)


def get(name: str) -> Group:
    if name not in _GROUPS:
        raise RuntimeError(f"collective group {name!r} was not joined in this process (split mode joins them at "
                           f"launch)")
    return _GROUPS[name]
