"""Can this machine run each mode, and if not, why: `python -m opd.doctor [--gpu] [--json]` (or `opd doctor`).

    python -m opd.doctor            # versions, GPUs and driver, NCCL, and whether cpu / colocated / split can run
    python -m opd.doctor --gpu      # and micro-checks on the GPU: CUDA IPC between two processes, a one-GPU NCCL
                                    # communicator, the Triton loss kernel at V=151936, GEMM and memory roofs,
                                    # FlashInfer sampling
    python -m opd.doctor --json     # the same checks as JSON

Each line is `ok`, `FAIL` (with the fix on the next line) or `--` (not checked here, and why). It needs only torch
and transformers: Ray, sglang, triton, FlashInfer and cupy are looked up without being required. The exit status
is 1 when a check failed.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import platform
import socket
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from opd.modes import cuda_state

SGLANG_PIN = "0.5.23"  # the version the adapter is contract-tested against (pyproject.toml's gpu extra)


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # "ok" | "fail" | "skip"
    detail: str
    fix: str = ""


def installed(dist: str) -> str | None:
    """The installed version of distribution `dist`, or None."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def import_error(module: str) -> str | None:
    """None when `module` imports; else its error in one line."""
    try:
        importlib.import_module(module)
    except Exception as e:  # a broken install raises anything from ImportError to OSError
        return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:160]}"
    return None


def _first(*dists: str) -> tuple[str, str | None]:
    """The first of `dists` that is installed (e.g. cupy's wheels per CUDA), with its version."""
    return next(((d, v) for d in dists if (v := installed(d))), (dists[0], None))


# ---------------------------------------------------------------- versions


MIN_PYTHON = (3, 11)  # sglang 0.5.23 requires it (pyproject.toml's requires-python follows)
MIN_GLIBC = (2, 34)  # sglang 0.5.23 and its kernels ship manylinux_2_34 wheels only
MODEL_CLASSES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")  # the families the presets load


def package_checks() -> list[Check]:
    ok_python = sys.version_info >= MIN_PYTHON
    out = [Check("python", "ok" if ok_python else "fail", platform.python_version(),
                 "" if ok_python else "Python 3.11 or newer (sglang 0.5.23, the GPU engine, requires it)"), _glibc_check()]
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU build"
    out.append(Check("torch", "ok", f"{torch.__version__} ({build})"))
    out.append(_transformers_check())
    for dist in ("ray", "pyarrow"):
        version = installed(dist)
        status = "ok" if version else "fail"
        out.append(Check(dist, status, version or "not installed", "" if version else "pip install -e ."))
    out += [_kernels_check(), _sglang_check(torch.__version__),
            _optional("flashinfer", ("flashinfer-python",), "flashinfer",
                      "the decode loop's GPU sampler; torch's is used without it"),
            _optional("triton", ("triton",), "triton", "the GPU loss kernel; the chunked torch path without it"),
            _cupy_check()]
    return out


def _glibc_check() -> Check:
    libc, version = platform.libc_ver()
    have = tuple(int(x) for x in version.split(".")[:2]) if libc == "glibc" and version else None
    if have is None:
        return Check("glibc", "skip", f"not glibc ({libc or 'unknown'}): sglang's manylinux_2_34 wheels need glibc "
                     f">= 2.34 (the GPU modes)")
    if have < MIN_GLIBC:
        return Check("glibc", "skip", f"{version}: the GPU install cannot run here (sglang 0.5.23 ships "
                     f"manylinux_2_34 wheels: glibc >= 2.34, e.g. Ubuntu 22.04 has 2.35, Debian 12 2.36)")
    return Check("glibc", "ok", version)


def _transformers_check() -> Check:
    """Installed, and its model classes import: they import the PyPI `kernels` whenever it is installed, which
    a `kernels` module first on sys.path (a folder of that name where Python starts) shadows."""
    version = installed("transformers")
    if version is None:
        return Check("transformers", "fail", "not installed", "pip install -c constraints.txt -e .")
    try:
        import transformers

        for name in MODEL_CLASSES:
            getattr(transformers, name)  # the lazy module imports the model's file (and hub kernels) here
    except Exception as e:
        error = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"
        spec = importlib.util.find_spec("kernels") if installed("kernels") else None
        shadow = spec is not None and not is_pypi_kernels(spec.origin)
        return Check("transformers", "fail", f"{version}, but its models do not import ({error})",
                     f"{spec.origin} shadows the PyPI kernels library transformers imports: run from a folder without "
                     f"a top-level kernels/ (or rename it)" if shadow else "pip install -c constraints.txt -e .")
    return Check("transformers", "ok", f"{version} ({', '.join(MODEL_CLASSES)} import)")


def is_pypi_kernels(origin: str | None) -> bool:
    """Whether `origin` (the file `import kernels` runs) is one of the installed PyPI distribution's files."""
    dist = importlib.metadata.distribution("kernels")
    return origin is not None and any(Path(str(dist.locate_file(f))).resolve() == Path(origin).resolve()
                                      for f in dist.files or [] if f.name == "__init__.py")


def _kernels_check() -> Check:
    """PyPI `kernels`, which transformers (>= 5.25 depends on it) and sglang import: the one `import kernels` finds."""
    version = installed("kernels")
    if version is None:
        return Check("kernels", "ok", "not installed (transformers < 5.25 and the cpu mode do without it)")
    spec = importlib.util.find_spec("kernels")
    if spec is None or not is_pypi_kernels(spec.origin):
        where = spec.origin if spec else "nothing"
        return Check("kernels", "fail", f"PyPI kernels {version} is installed, but `import kernels` finds {where}",
                     "run from a folder without a top-level kernels/ (or rename it)")
    return Check("kernels", "ok", f"{version} (PyPI's, the one transformers and sglang import)")


def _optional(name: str, dists: tuple[str, ...], module: str, role: str) -> Check:
    dist, version = _first(*dists)
    if version is None:
        return Check(name, "skip", f"not installed: {role}", "pip install -e '.[gpu]'")
    error = import_error(module)
    if error:
        return Check(name, "fail", f"{dist} {version} does not import ({error})", f"pip install --force-reinstall "
                     f"'{dist}=={version}', or pip install -e '.[gpu]' for the versions sglang {SGLANG_PIN} pins")
    return Check(name, "ok", f"{version}")


def _sglang_check(torch_version: str) -> Check:
    """sglang is not imported (it needs a GPU to import its engine); its pins are compared with what is here."""
    version = installed("sglang")
    if version is None:
        return Check("sglang", "skip", "not installed: the rollout.engine=sglang GPU engine (rollout.engine=hf "
                     "works without it)", "pip install -e '.[gpu]'")
    wrong = []
    for req in importlib.metadata.requires("sglang") or []:
        name, _, pin = req.partition("==")
        name = name.split("[")[0].strip()
        if pin and ";" not in req and name in ("torch", "transformers", "flashinfer_python"):
            have = torch_version.split("+")[0] if name == "torch" else installed(name.replace("_", "-"))
            if have != pin.strip():
                wrong.append(f"{name} {have or 'missing'}, pins {pin.strip()}")
    if version != SGLANG_PIN:
        return Check("sglang", "fail", f"{version}; the adapter is checked against {SGLANG_PIN}",
                     f"pip install 'sglang=={SGLANG_PIN}'")
    if wrong:
        return Check("sglang", "skip", f"{version}, installed without its pins (the engine will not start): "
                     f"{'; '.join(wrong)}", "pip install -e '.[gpu]' (the tests' --no-deps install reads its source)")
    return Check("sglang", "ok", version)


def _cupy_check() -> Check:
    dist, version = _first("cupy-cuda13x", "cupy-cuda12x", "cupy")
    if version is None:
        return Check("cupy", "skip", "not installed; not needed: split mode's NCCL is torch's own (torch.distributed)")
    error = import_error("cupy")
    if error:
        return Check("cupy", "skip", f"{dist} {version} does not import ({error}); not needed: split mode's NCCL is "
                     f"torch's own (torch.distributed)", f"pip uninstall {dist}, or install the cupy of torch's CUDA")
    return Check("cupy", "ok", f"{dist} {version}; not used here (split mode's NCCL is torch's own)")


# ---------------------------------------------------------------- GPUs and modes


def device_checks() -> list[Check]:
    state = cuda_state()
    if state.usable:
        names = sorted({torch.cuda.get_device_name(i) for i in range(state.usable)})
        gpus = Check("gpus", "ok", f"{state.usable} usable ({', '.join(names)}), driver {state.driver or '?'}, "
                     f"torch built for CUDA {state.torch_cuda}")
    elif state.unusable:
        gpus = Check("gpus", "fail", f"{state.gpus_present} present, none usable", state.why)
    else:
        gpus = Check("gpus", "skip", "no GPU (no NVIDIA driver or device on this machine)")
    if not state.usable:
        nccl = Check("nccl", "skip", "no usable GPU")
    elif torch.distributed.is_nccl_available():
        nccl = Check("nccl", "ok", "torch's NCCL {}".format(".".join(map(str, torch.cuda.nccl.version()))))
    else:
        nccl = Check("nccl", "fail", "this torch has no NCCL", "install a CUDA build of torch: pip install -e '.[gpu]'")
    return [gpus, nccl]


def mode_checks(checks: list[Check]) -> list[Check]:
    """Whether cpu, colocated and split can run here, from the checks before."""
    status = {c.name: c for c in checks}
    core = [c for c in checks if c.name in ("torch", "transformers", "ray", "pyarrow") and c.status != "ok"]
    out = [Check("mode cpu", "fail", f"missing: {', '.join(c.name for c in core)}", "pip install -e .") if core
           else Check("mode cpu", "ok", "ready")]
    state = cuda_state()
    for mode, needed in (("colocated", 1), ("split", 2)):
        if core:
            out.append(Check(f"mode {mode}", "fail", f"missing: {', '.join(c.name for c in core)}", "pip install -e ."))
        elif state.unusable:
            out.append(Check(f"mode {mode}", "fail", "a GPU is present but unusable (see gpus)", state.why))
        elif state.usable < needed:
            have = "no GPU" if not state.usable else f"{state.usable} GPU, needs {needed}"
            out.append(Check(f"mode {mode}", "skip", f"not available: {have} (--set run.device=cpu runs its "
                             f"plumbing on the CPU)"))
        elif mode == "split" and status["nccl"].status != "ok":
            out.append(Check("mode split", "fail", "no NCCL", status["nccl"].fix))
        else:
            engine = "hf and sglang engines" if status["sglang"].status == "ok" else "hf engine (sglang: see above)"
            out.append(Check(f"mode {mode}", "ok", f"ready: {state.usable} GPU(s), {engine}"))
    return out


# ---------------------------------------------------------------- --gpu micro-checks (torch, triton, flashinfer)

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

    from opd.doctor import _ipc_child  # by its module's name, also when this runs as __main__
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


# ---------------------------------------------------------------- report


def run_checks(gpu: bool = False) -> list[Check]:
    checks = package_checks()
    checks += device_checks()
    checks += mode_checks(checks)
    if gpu:
        checks += gpu_checks()
    else:
        checks.append(Check("gpu micro-checks", "skip", "not run: python -m opd.doctor --gpu"))
    return checks


def format_checks(checks: list[Check]) -> str:
    mark = {"ok": "ok", "fail": "FAIL", "skip": "--"}
    lines = [f"opd doctor ({time.strftime('%Y-%m-%d')}, {platform.system()} {platform.machine()}): can this machine "
             f"run each mode?"]
    for c in checks:
        lines.append(f"  {mark[c.status]:<5} {c.name:<17} {c.detail}")
        if c.fix and c.status != "ok":
            lines.append(f"  {'':<5} {'':<17} fix: {c.fix}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m opd.doctor", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="run the GPU micro-checks too")
    parser.add_argument("--json", action="store_true", help="print the checks as JSON")
    args = parser.parse_args(argv)
    checks = run_checks(gpu=args.gpu)
    print(json.dumps([asdict(c) for c in checks], indent=1) if args.json else format_checks(checks))
    return 1 if any(c.status == "fail" for c in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
