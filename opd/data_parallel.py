"""The learner's data parallelism: `run.learner_replicas` learner processes in one torch.distributed group (NCCL on
GPUs, gloo on CPU), the student sharded across them by torch FSDP2 (`fully_shard`: parameters, gradients and the
optimizer state each 1/N per replica), each replica training its share of the step's micro-batches.

The step's loss is normalised by the whole batch's response tokens on every replica, and FSDP's reduce-scatter
*sums* the replicas' gradients (divide factor 1), so the update is the single learner's on the same batch.
Collectives must match across replicas: a replica with fewer micro-batches than another runs empty passes
(`share`), and what every replica reports (loss, statistics) is all-reduced.

With one replica nothing here touches torch.distributed: `Student` is the same module, unsharded.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

OPTIMIZER_DIR = "optimizer"  # a checkpoint's sharded optimizer state (torch.distributed.checkpoint)
_REPLICAS = None  # the learners' process group in this process, once `init_group` joined it


class Student(nn.Module):
    """The student and its loss in one forward: FSDP unshards a module's parameters around its forward, so the
    output embedding the chunked loss multiplies with (outside the decoder) must be used inside one."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, positions: torch.Tensor, loss_fn):
        """`loss_fn(h, w)` of the final hidden states `h` `[n, d]` at `positions` of the packed row and the output
        embedding `w` `[V, d]`: one packed row, position ids restarting per sequence, no attention mask and no KV
        cache (transformers keeps each sequence's attention to itself only when both are absent)."""
        hidden_1Td = self.model.get_decoder()(input_ids=input_ids, position_ids=position_ids,
                                              use_cache=False).last_hidden_state
        return loss_fn(hidden_1Td[0, positions], self.model.get_output_embeddings().weight)


def init_group(rank: int, world: int, init_method: str, device: torch.device):
    """Join the learners' process group (rank 0's address, no torchrun) and return its one-dimensional mesh."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    global _REPLICAS
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world,
                            device_id=device if device.type == "cuda" else None)
    mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("dp",))
    _REPLICAS = mesh.get_group()
    return mesh


def shard(student: Student, mesh, *, bf16: bool) -> None:
    """FSDP2 over the mesh: each decoder layer its own unit (gathered for its forward and backward only), the
    rest (embeddings, final norm, output embedding: tied or not, one unit) at the root. bf16: parameters gathered
    in bf16, gradients reduced in fp32 (the fp32 master shards stay fp32)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16
              else MixedPrecisionPolicy())
    for layer in getattr(student.model.get_decoder(), "layers", ()):
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(student, mesh=mesh, mp_policy=policy)
    for module in student.modules():
        if hasattr(module, "set_gradient_divide_factor"):
            # a plain sum: each replica's loss is already over the global tokens (and gloo has no pre-scaled sum)
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)


def share(count: int, rank: int, world: int) -> list[int | None]:
    """Replica `rank`'s micro-batches of a plan of `count`: k = rank, rank + world, ...; padded with None (an
    empty pass) to ceil(count / world), the number every replica runs, so their collectives match."""
    mine: list[int | None] = list(range(rank, count, world))
    return mine + [None] * (math.ceil(count / world) - len(mine))


def empty_pass(student: Student, pad_id: int, device: torch.device, *, backward: bool) -> None:
    """A replica's pass with no micro-batch of its own: one token through the whole student, its result times
    zero, so it joins the other replicas' gathers (and, in a step, their gradient reductions) adding nothing."""
    one = torch.zeros((1, 1), dtype=torch.long, device=device)
    out = student(one + pad_id, one, torch.zeros(1, dtype=torch.long, device=device),
                  lambda h, w: (h.sum() + w.sum()) * 0.0)
    if backward:
        out.backward()


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """`t` summed (or maxed) over the learner replicas, in place; unchanged with one (whose process may be in
    another torch.distributed world: split mode's groups, which this must not touch)."""
    import torch.distributed as dist

    if _REPLICAS is not None:
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX, group=_REPLICAS)
    return t


def local(t: torch.Tensor) -> torch.Tensor:
    """This replica's shard of a sharded tensor (the tensor itself otherwise)."""
    return t.to_local() if hasattr(t, "to_local") else t


def replicated(t: torch.Tensor) -> torch.Tensor:
    """A replicated DTensor (a clipped gradient's norm) as a plain tensor."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of optimizer state this replica holds (its shards of Adam's moments)."""
    return sum(local(v).numel() * v.element_size() for state in optimizer.state.values()
               for v in state.values() if torch.is_tensor(v) and v.dim() > 0)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole student's weights on rank 0, on the CPU (a collective: every replica calls it; others get {})."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Every replica's shards from the whole weights (each replica read them), in place."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))  # tied names: checked by the caller


def save_optimizer(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """The sharded optimizer state under `path`/optimizer: each replica writes its own shards (a collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=Path(path) / OPTIMIZER_DIR)


def load_optimizer(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    state = {"optimizer": get_optimizer_state_dict(model, optimizer)}  # the layout to read into
    dcp.load(state, checkpoint_id=Path(path) / OPTIMIZER_DIR)
    set_optimizer_state_dict(model, optimizer, optim_state_dict=state["optimizer"])


def broadcast_object(obj, src: int = 0):
    """`obj` from rank `src` on every replica (a path both must write under)."""
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=src, group=_REPLICAS)
    return box[0]


def barrier() -> None:
    import torch.distributed as dist

    dist.barrier(group=_REPLICAS)
