"""Split-mode weight broadcast, learner rank 0 -> engine rank 1, with gloo standing in for NCCL on CPU
(opd/transport/groups.py: the same broadcast_buckets call, another backend)."""

import pytest
import ray
import torch
from transformers import AutoModelForCausalLM

from opd.transport import weights



class Side:
    """One end of the broadcast: a model, its serving buffer, the bucket plan."""

    def __init__(self, model_dir: str, rank: int, bind: bool, device: str = "cpu"):
        torch.set_num_threads(1)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
        self.layout = weights.FlatLayout.of(self.model)
        self.buffer = weights.ServingBuffer(self.layout, torch.float32, device=device)
        self.buckets = weights.plan_buckets(self.layout, element_bytes=4, bucket_bytes=256 * 1024)
        if bind:  # the engine: its parameters are the buffer's views, so a received bucket is the weights
            weights.bind_to_buffer(self.model, self.buffer)
        self.rank = rank

    def join(self, world_size: int, group: str, init_method: str, backend: str = "gloo") -> None:
        from opd.transport import groups

        groups.join(groups.GroupSpec({group: tuple(range(world_size))}, world_size, backend, init_method), self.rank)

    def perturb_and_send(self, group: str) -> list[float]:
        with torch.no_grad():
            for p in self.model.parameters():
                p.mul_(1.5).add_(0.25)  # the "optimizer step"
        self.buffer.refresh(self.model)
        weights.broadcast_buckets(self.buffer, self.buckets, group)
        return [float(p.detach().double().sum()) for p in self.model.parameters()]

    def receive(self, group: str) -> list[float]:
        weights.broadcast_buckets(self.buffer, self.buckets, group)  # the same call receives
        return [float(p.detach().double().sum()) for p in self.model.parameters()]

    def logits(self, ids):
        with torch.no_grad():
            return self.model(input_ids=ids.to(self.model.device)).logits.cpu()


@pytest.fixture(scope="module")
def ray_local(root):
    # the workers import `Side` from this module: put tests/ on their path
    ray.init(num_cpus=2, include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONPATH": f"{root}:{root / 'tests'}"}})
    yield
    ray.shutdown()


@pytest.mark.slow
def test_gloo_broadcast_reaches_the_engine_parameters(root, ray_local):
    model_dir = str(root / "assets/toy/teacher")
    learner = ray.remote(Side).options(num_cpus=0.5).remote(model_dir, 0, False)
    engine = ray.remote(Side).options(num_cpus=0.5).remote(model_dir, 1, True)
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        init_method = f"tcp://127.0.0.1:{sock.getsockname()[1]}"
    ray.get([learner.join.remote(2, "opd-weights", init_method), engine.join.remote(2, "opd-weights", init_method)])
    ids = torch.tensor([[3, 4, 14, 5, 6, 15]])
    before = ray.get(engine.logits.remote(ids))
    sent, received = ray.get([learner.perturb_and_send.remote("opd-weights"), engine.receive.remote("opd-weights")])
    assert sent == received  # every parameter arrived, bucket by bucket, into the engine's own parameters
    after = ray.get(engine.logits.remote(ids))
    assert torch.allclose(after, ray.get(learner.logits.remote(ids)), atol=1e-6)
    assert not torch.allclose(before, after)


class Holder:
    """Keeps a tensor alive in its own process and can read or change it."""

    def __init__(self):
        self.tensor = torch.zeros(1000)

    def handle(self) -> bytes:
        return weights.share_handle(self.tensor)

    def fill(self, value: float) -> None:
        self.tensor.fill_(value)

    def total(self) -> float:
        return float(self.tensor.sum())


class Mapper:
    def open(self, handle: bytes) -> float:
        self.tensor = weights.open_handle(handle)
        return float(self.tensor.sum())

    def total(self) -> float:
        return float(self.tensor.sum())

    def write(self, value: float) -> None:
        self.tensor[:] = value


def test_handle_round_trip_maps_the_same_memory(ray_local):
    """What colocated mode does with a CUDA IPC handle, on a CPU tensor: another process maps, not copies."""
    holder = ray.remote(Holder).options(num_cpus=0.25).remote()
    mapper = ray.remote(Mapper).options(num_cpus=0.25).remote()
    ray.get(holder.fill.remote(1.0))
    assert ray.get(mapper.open.remote(holder.handle.remote())) == 1000.0
    ray.get(holder.fill.remote(2.0))  # the producer writes ...
    assert ray.get(mapper.total.remote()) == 2000.0  # ... the consumer sees it
    ray.get(mapper.write.remote(3.0))  # and the other way round
    assert ray.get(holder.total.remote()) == 3000.0
