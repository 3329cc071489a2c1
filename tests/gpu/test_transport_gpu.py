"""The GPU modes' transports on real CUDA devices: the colocated serving buffer and teacher hidden states through
CUDA IPC handles between two processes (1 GPU), the hf engine's decode loop on the GPU (torch and FlashInfer
sampling), and the split mode's NCCL groups (torch.distributed; 2 GPUs and Ray). The CPU stand-ins of each run in tests/."""

from __future__ import annotations

import io

import pytest
import torch
import torch.multiprocessing as mp
from gpu_deps import cuda, needs, nccl

from opd.transport import weights
from opd.transport.hidden_states import IPCOutbox

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs 1 CUDA GPU")


def _to_bytes(tensor: torch.Tensor) -> bytes:
    """A host copy, serialised: plain bytes through the queue, so nothing depends on the child staying alive
    (a CPU tensor put on a torch.multiprocessing queue would be another shared-memory mapping)."""
    buf = io.BytesIO()
    torch.save(tensor.detach().cpu().clone(), buf)
    return buf.getvalue()


def _from_bytes(data: bytes) -> torch.Tensor:
    return torch.load(io.BytesIO(data))


def _consumer(handle: bytes, layout, queue, done) -> None:
    """Another process: map the producer's buffer, send back everything it sees, write into it, wait."""
    flat = weights.open_handle(handle)
    queue.put((flat.device.type, _to_bytes(flat)))
    flat[: layout.numel // 2] = 2.0  # a write the producer must see: the same memory, not a copy
    torch.cuda.synchronize()
    queue.put("written")
    done.wait()


def test_cuda_ipc_handle_maps_the_serving_buffer_in_another_process():
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Linear(128, 32)).cuda()
    buffer = weights.ServingBuffer(weights.FlatLayout.of(model), torch.bfloat16, device="cuda")
    buffer.refresh(model)
    torch.cuda.synchronize()
    ctx = mp.get_context("spawn")
    queue, done = ctx.Queue(), ctx.Event()
    sent = buffer.flat.cpu()  # before the child starts: it writes into the buffer once it has sent it back
    half = buffer.layout.numel // 2
    child = ctx.Process(target=_consumer, args=(weights.share_handle(buffer.flat), buffer.layout, queue, done))
    child.start()
    try:
        device, seen = queue.get(timeout=120)
        seen = _from_bytes(seen)
        assert device == "cuda"
        assert seen.dtype == sent.dtype and seen.shape == sent.shape, (seen.dtype, seen.shape)
        assert torch.equal(seen, sent), f"{int((seen != sent).sum())} of {sent.numel()} elements differ"
        assert queue.get(timeout=60) == "written"
        assert bool((buffer.flat[:half] == 2.0).all()), "the child's write is not in the producer's buffer"
        assert torch.equal(buffer.flat[half:].cpu(), sent[half:]), "the child wrote outside its half"
    finally:
        done.set()
        child.join(timeout=60)


def _hidden_consumer(remote, queue) -> None:
    fetched = remote.fetch("cuda")
    queue.put((fetched.device.type, _to_bytes(fetched)))


def test_teacher_hidden_states_by_ipc_handle():
    outbox = IPCOutbox()
    hidden = torch.randn(300, 256, device="cuda")
    remote = outbox.export(hidden)
    assert remote.handle is not None and remote.shape == (300, 256)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_hidden_consumer, args=(remote, queue))
    child.start()
    try:
        device, fetched = queue.get(timeout=120)
        fetched, want = _from_bytes(fetched), hidden.cpu()
        assert device == "cuda"
        assert fetched.dtype == want.dtype and fetched.shape == want.shape, (fetched.dtype, fetched.shape)
        assert torch.equal(fetched, want), f"{int((fetched != want).sum())} of {want.numel()} elements differ"
    finally:
        child.join(timeout=60)


@pytest.mark.parametrize("sampler", ["torch", "flashinfer"])
def test_decode_loop_on_gpu_reports_the_sampled_distribution(root, sampler):
    if sampler == "flashinfer":
        needs("flashinfer", required=False, why="optional, rollout.sampler=auto falls back to torch")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opd.actors.engines.hf import HFEngine

    tok = AutoTokenizer.from_pretrained(root / "assets/toy/student")
    model = AutoModelForCausalLM.from_pretrained(root / "assets/toy/student", dtype=torch.float32).cuda()
    engine = HFEngine(model, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, sampler=sampler)
    prompts = [tok(p).input_ids for p in ["07+45=", "99+99=", "1+2="]]
    batch = engine.generate(prompts, num_samples=8, temperature=0.9, max_new_tokens=6, seed=0)
    for prompt, response, lp in zip(batch.prompts(), batch.responses(),
                                    torch.split(batch.logprobs, batch.response_lens.tolist()), strict=True):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + response], device="cuda")).logits[0].float()
        want = torch.log_softmax(logits[len(prompt) - 1: -1] / 0.9, -1).gather(
            1, torch.tensor(response, device="cuda")[:, None])[:, 0].cpu()
        assert torch.allclose(lp, want, atol=1e-3)


def test_nccl_weight_broadcast_between_two_gpus(root):
    cuda(2)
    nccl()  # torch's own NCCL (opd/transport/groups.py); a torch without it fails here, it does not skip
    ray = needs("ray", required=False, why="the two sides are Ray actors")
    import socket
    import sys

    sys.path.insert(0, str(root / "tests"))
    import test_broadcast  # the gloo test's two sides, here with NCCL on two GPUs

    ray.init(num_gpus=2, include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONPATH": f"{root}:{root / 'tests'}"}})
    try:
        model_dir = str(root / "assets/toy/teacher")
        learner = ray.remote(test_broadcast.Side).options(num_gpus=1).remote(model_dir, 0, False, "cuda")
        engine = ray.remote(test_broadcast.Side).options(num_gpus=1).remote(model_dir, 1, True, "cuda")
        with socket.socket() as sock:
            sock.bind(("", 0))
            init_method = f"tcp://127.0.0.1:{sock.getsockname()[1]}"
        ray.get([learner.join.remote(2, "opd-weights", init_method, "nccl"),
                 engine.join.remote(2, "opd-weights", init_method, "nccl")])
        sent, received = ray.get([learner.perturb_and_send.remote("opd-weights"),
                                  engine.receive.remote("opd-weights")])
        assert sent == received
    finally:
        ray.shutdown()
