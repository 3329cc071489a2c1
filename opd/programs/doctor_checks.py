"""The doctor's checks of this machine: what is installed (versions, pins, imports), its GPUs, and which modes can run.

Each check is a `Check`: `ok`, `fail` (with the fix) or `skip` (not checked here, and why). Only torch and
transformers are needed: Ray, sglang, triton, FlashInfer and cupy are looked up without being required. The GPU
micro-checks are opd/programs/doctor_gpu.py; the report, opd/programs/doctor.py.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform
import sys
from dataclasses import dataclass
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
        return Check("sglang", "skip", f"{version}, installed without its pins (its GPU engine will not start): "
                     f"{'; '.join(wrong)}", "pip install -e '.[gpu]' (the tests' --no-deps install runs its CPU "
                     "engine: docs/gpu.md)")
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
    return [gpus, nccl, sampler_check(state.usable > 0)]


def sampler_check(gpu: bool) -> Check:
    """The sampler rollout.sampler=auto picks here (the hf engine's resolve_sampler, opd/actors/engines/hf.py), and
    why: FlashInfer on a GPU where it imports and has its kernels (nvcc to compile them, or flashinfer-jit-cache)."""
    from opd.samplers import flashinfer_kernels, flashinfer_problem

    if not gpu:
        return Check("sampler auto", "ok", "torch: no usable GPU (FlashInfer samples on a GPU)")
    if (problem := flashinfer_problem()) is None:
        return Check("sampler auto", "ok", f"flashinfer: it imports and has {flashinfer_kernels()}")
    return Check("sampler auto", "skip", f"torch, not flashinfer: {problem[0]}", problem[1])


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
