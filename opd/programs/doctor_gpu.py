"""The doctor's `--gpu` micro-checks, a few seconds each on the first GPU: CUDA IPC between two processes, a one-GPU
NCCL communicator, the Triton loss kernel at V=151936, GEMM and memory roofs against the datasheet, FlashInfer
sampling. The IPC and communicator checks also run on CPU (shared memory, gloo), which is how the tests run them.
"""

from __future__ import annotations

import importlib.util
import socket

import torch

from opd.programs.doctor_checks import Check


V, VALID_VOCAB = 151936, 151646  # Qwen2.5's output rows and tokenizer entries
ROOF_FLOOR = 0.3  # a GEMM or copy below this fraction of the datasheet peak says the GPU is throttled or shared


def gpu_checks() -> list[Check]:
    """`--gpu`: micro-checks on the first GPU, a few seconds each; one that cannot run says why."""
    if not torch.cuda.is_available():
        return [Check("gpu micro-checks", "skip", "no usable GPU (see gpus)")]
    out = []
    for name, check in (("cuda ipc", ipc_round_trip), ("nccl communicator", nccl_one_gpu),
                        ("triton loss kernel", triton_kernel), ("bf16 gemm", gemm_roof),
                        ("memory bandwidth", bandwidth_roof), ("flashinfer sampling", flashinfer_sampling)):
        try:
            out.append(check())
        except Exception as e:  # one broken piece must not hide the others
            first = (str(e).strip().splitlines() or [""])[0][:200]
            out.append(Check(name, "fail", f"{type(e).__name__}: {first}"))
    return out


def _ipc_child(handle: bytes, queue) -> None:
    from opd.transport.weights import open_handle

    mapped = open_handle(handle)
    queue.put(float(mapped.double().sum()))
    mapped.mul_(2.0)  # the producer must see this write: the same memory, not a copy
    if mapped.is_cuda:
        torch.cuda.synchronize()
    queue.put("written")


def ipc_round_trip(device: str = "cuda") -> Check:
    """The colocated mode's transport: the project's own share_handle / open_handle between two processes (a
    CUDA IPC handle; with device="cpu", the shared-memory file the mode's plumbing uses on CPU)."""
    import torch.multiprocessing as mp

    from opd.transport.weights import share_handle

    tensor = torch.arange(1 << 20, dtype=torch.float32, device=device)
    want = float(tensor.double().sum())
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_ipc_child, args=(share_handle(tensor), queue))
    child.start()
    try:
        seen, written = queue.get(timeout=120), queue.get(timeout=60)
    finally:
        child.join(timeout=60)
    doubled = float(tensor.double().sum())
    ok = seen == want and written == "written" and doubled == 2 * want
    return Check(f"{'cuda' if device == 'cuda' else 'shared-memory'} ipc", "ok" if ok else "fail",
                 f"4 MiB mapped by a second process: read {'intact' if seen == want else 'WRONG'}, its write "
                 f"{'seen' if doubled == 2 * want else 'NOT seen'} here")


def nccl_one_gpu(backend: str = "nccl") -> Check:
    """split mode's NCCL, opened as transport/groups.py opens it (torch.distributed), with one rank (gloo on CPU
    checks the same calls)."""
    import torch.distributed as dist

    if backend == "nccl" and not dist.is_nccl_available():
        return Check("nccl communicator", "fail", "this torch has no NCCL", "install a CUDA build of torch")
    with socket.socket() as sock:
        sock.bind(("", 0))
        port = sock.getsockname()[1]
    device = torch.device("cuda", 0) if backend == "nccl" else torch.device("cpu")
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", world_size=1, rank=0,
                            device_id=device if backend == "nccl" else None)
    try:
        x = torch.full((1 << 20,), 3.0, device=device)
        dist.all_reduce(x)
        ok = bool((x == 3.0).all())
    finally:
        dist.destroy_process_group()
    version = ".".join(map(str, torch.cuda.nccl.version())) if backend == "nccl" else backend
    return Check(f"{backend} communicator", "ok" if ok else "fail", f"NCCL {version}: a one-GPU all-reduce "
                 f"{'returned its input' if ok else 'changed its input'}" if backend == "nccl" else
                 f"a one-rank {backend} all-reduce {'returned its input' if ok else 'changed its input'}")


def triton_kernel() -> Check:
    """kernels/triton_kl.py against the torch reference on [32, 151936] logits, fp32 and bf16."""
    if importlib.util.find_spec("triton") is None:
        return Check("triton loss kernel", "skip", "triton is not installed")
    from opd.kernels.triton_kl import ref_row_divergence, row_divergence_

    worst = {}
    for dtype, grad_tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        g = torch.Generator(device="cuda").manual_seed(0)
        student = (torch.randn(32, V, generator=g, device="cuda") * 3).to(dtype)
        teacher = (torch.randn(32, V, generator=g, device="cuda") * 3).to(dtype)
        weights = torch.ones(32, device="cuda")
        kw = dict(kind="jsd", beta=0.5, temperature=1.0, valid_vocab=VALID_VOCAB, grad_scale=1e-3)
        want_rows, _, want_grad = ref_row_divergence(student, teacher, weights, **kw)
        grad = student.clone()
        rows, _ = row_divergence_(grad, teacher, weights, **kw)
        row_err = float(((rows - want_rows).abs() / (want_rows.abs() + 1e-5)).max())
        grad_err = float((grad.float() - want_grad).abs().max() / want_grad.abs().max())
        worst[dtype] = (row_err, grad_err, row_err <= 1e-5 and grad_err <= grad_tol)
    ok = all(w[2] for w in worst.values())
    detail = "; ".join(f"{str(d).removeprefix('torch.')}: rows {w[0]:.1e}, grad {w[1]:.1e}" for d, w in worst.items())
    return Check("triton loss kernel", "ok" if ok else "fail", f"jsd at V={V} vs torch: {detail} (relative)")


def _timed(fn, repeats: int) -> float:
    fn()  # warm up
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / repeats


def _against_datasheet(name: str, measured: float, peak: float | None, unit: str, scale: float) -> Check:
    if peak is None:
        return Check(name, "ok", f"{measured / scale:.0f} {unit} ({torch.cuda.get_device_name()}: no datasheet "
                     f"entry in opd/roofline.py)")
    fraction = measured / peak
    return Check(name, "ok" if fraction >= ROOF_FLOOR else "fail",
                 f"{measured / scale:.0f} {unit}, {fraction:.0%} of the datasheet's {peak / scale:.0f}",
                 "" if fraction >= ROOF_FLOOR else "another process on the GPU, a power or clock cap, or a MIG slice")


def gemm_roof() -> Check:
    from opd.roofline import lookup_gpu

    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    seconds = _timed(lambda: torch.mm(a, b), 20)
    peak = lookup_gpu(torch.cuda.get_device_name())
    return _against_datasheet("bf16 gemm", 2 * n**3 / seconds, peak and peak.flops_for("bfloat16"), "TFLOP/s", 1e12)


def bandwidth_roof() -> Check:
    from opd.roofline import lookup_gpu

    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    seconds = _timed(lambda: dst.copy_(src), 20)
    peak = lookup_gpu(torch.cuda.get_device_name())
    return _against_datasheet("memory bandwidth", 2 * src.numel() / seconds, peak and peak.memory_bytes_per_s,
                              "GB/s", 1e9)


def flashinfer_sampling() -> Check:
    """The decode loop's GPU sampler: token frequencies against the probabilities they are drawn from."""
    if importlib.util.find_spec("flashinfer") is None:
        return Check("flashinfer sampling", "skip", "flashinfer is not installed (the decode loop samples with torch)")
    import flashinfer

    probs_row = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.05, 0.03, 0.02, 0.0], device="cuda")
    probs = probs_row.expand(200_000, -1).contiguous()
    tokens = flashinfer.sampling.sampling_from_probs(probs).long()
    freq = torch.bincount(tokens, minlength=8).float() / tokens.numel()
    error = float((freq - probs_row).abs().max())
    zero = int((tokens == 7).sum())
    ok = error < 0.01 and zero == 0
    return Check("flashinfer sampling", "ok" if ok else "fail", f"{flashinfer.__version__}: 200,000 draws, largest "
                 f"frequency error {error:.4f}, a zero-probability token drawn {zero} times")
