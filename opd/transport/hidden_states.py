"""Teacher -> learner tensors (the teacher's hidden states) outside Ray's object store.

cpu mode sends the tensor itself through the object store. colocated mode sends a CUDA IPC handle (teacher and
learner share one GPU; a shared-memory file when the mode's plumbing runs on CPU): the learner maps the teacher's
memory, nothing is copied. split mode sends the shape, and the tensor follows over a collective send/recv (NCCL
between the two GPUs; gloo on CPU) while the learner receives it straight into its own device.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

from opd.transport import groups
from opd.transport.weights import open_handle, share_handle

HIDDEN_GROUP = "opd-hidden"  # the learner is rank 0, teacher replica i is rank 1 + i


@dataclass(frozen=True)
class RemoteTensor:
    """A tensor that stayed in the producer's process; `fetch` makes it local to the consumer."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    handle: bytes | None = None  # ipc: share_handle's bytes
    src_rank: int = -1  # collective: the sender's rank in `group`
    group: str = ""

    def fetch(self, device: torch.device | str) -> torch.Tensor:
        if self.handle is not None:
            return open_handle(self.handle).to(device)  # mapped; on the producer's device this is no copy
        out = torch.empty(self.shape, dtype=self.dtype, device=device)
        groups.get(self.group).recv(out, self.src_rank)  # the producer's `Outbox.send` runs at the same time
        return out


class Outbox:
    """The producer's side of the teacher's states, one per way they travel (opd/modes.py `state_outbox` picks it
    once): `export` each tensor as the learner will `fetch` it, `begin` each batch, `send` what waits for a
    collective (`sends`: the driver calls it beside the learner's receive)."""

    sends = False

    def begin(self) -> None:
        """A new batch."""

    def export(self, tensor: torch.Tensor) -> torch.Tensor | RemoteTensor:
        raise NotImplementedError

    def send(self) -> int:
        return 0


class ObjectStoreOutbox(Outbox):
    """cpu mode: the tensor itself, through Ray's object store."""

    def export(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.cpu()


class IPCOutbox(Outbox):
    """colocated mode: a CUDA IPC handle (a shared-memory file on CPU). The tensors of the last `keep` batches stay
    referenced (the learner maps one batch's while the teacher may already score the next)."""

    def __init__(self, keep: int = 2):
        self._held: deque[list[torch.Tensor]] = deque([[]], maxlen=keep)

    def begin(self) -> None:
        """A new batch: the tensors of the oldest batch held are released."""
        self._held.append([])

    def export(self, tensor: torch.Tensor) -> RemoteTensor:
        tensor = tensor.contiguous()
        self._held[-1].append(tensor)
        return RemoteTensor(tuple(tensor.shape), tensor.dtype, handle=share_handle(tensor))


class CollectiveOutbox(Outbox):
    """split mode: the shape now; the tensor waits for `send`, a collective send to rank 0 (NCCL; gloo on CPU)."""

    sends = True

    def __init__(self, rank: int, group: str = HIDDEN_GROUP):
        self.rank, self.group = rank, group
        self._pending: list[torch.Tensor] = []

    def export(self, tensor: torch.Tensor) -> RemoteTensor:
        tensor = tensor.contiguous()
        self._pending.append(tensor)
        return RemoteTensor(tuple(tensor.shape), tensor.dtype, src_rank=self.rank, group=self.group)

    def send(self) -> int:
        """Send every tensor exported since the last call, in order, to rank 0. Returns how many."""
        pending, self._pending = self._pending, []
        for tensor in pending:
            groups.get(self.group).send(tensor, 0)
        if pending and pending[0].is_cuda:
            torch.cuda.synchronize(pending[0].device)  # the NCCL sends are only enqueued: done before the next step
        return len(pending)


def fetch(value: torch.Tensor | RemoteTensor | None, device: torch.device | str) -> torch.Tensor | None:
    if isinstance(value, RemoteTensor):
        return value.fetch(device)
    return None if value is None else value.to(device)
