"""Whether FlashInfer can sample on this machine's GPU: the hf engine's `rollout.sampler=auto` (opd/actors/engines/hf.py
resolve_sampler), preflight's refusal of an explicit `flashinfer`, and the doctor's report all ask here.

FlashInfer (0.7.2) compiles its kernels when they are first used (JIT), with the CUDA toolkit's nvcc, unless the
flashinfer-jit-cache distribution brings them precompiled. A machine with only the NVIDIA driver has neither: the
first sampled token would fail, in the middle of the first rollout.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

FLASHINFER_FIX = "install the CUDA toolkit (nvcc) or flashinfer-jit-cache, or set rollout.sampler=torch"
INSTALL_FIX = "pip install -e '.[gpu]', or set rollout.sampler=torch"


def flashinfer_kernels() -> str | None:
    """Where FlashInfer gets its kernels here, or None. As FlashInfer looks for them: flashinfer-jit-cache's
    precompiled ones when `flashinfer_jit_cache` is importable (its jit/env.py), else the JIT's `bin/nvcc` under
    the CUDA home its jit/cpp_ext.py `get_cuda_path` picks: CUDA_HOME, CUDA_PATH, the folder above the `nvcc` on
    PATH, /usr/local/cuda."""
    if importlib.util.find_spec("flashinfer_jit_cache") is not None:
        return "flashinfer-jit-cache's precompiled kernels"
    on_path = shutil.which("nvcc")
    home = (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
            or (os.path.dirname(os.path.dirname(on_path)) if on_path else "/usr/local/cuda"))
    nvcc = Path(home) / "bin" / "nvcc"
    return f"nvcc {nvcc}" if nvcc.is_file() else None


def flashinfer_problem() -> tuple[str, str] | None:
    """Why FlashInfer cannot sample on this machine's GPU and the fix, or None when it can: it imports and has its
    kernels (the GPU itself is the caller's to check)."""
    if importlib.util.find_spec("flashinfer") is None:
        return "flashinfer is not installed", INSTALL_FIX
    try:
        import flashinfer  # noqa: F401
    except Exception as e:  # a broken install raises anything from ImportError to OSError
        first = (str(e).strip().splitlines() or [""])[0][:160]
        return f"flashinfer does not import ({type(e).__name__}: {first})", INSTALL_FIX
    if flashinfer_kernels() is None:
        return ("flashinfer compiles its kernels at first use and finds no nvcc (CUDA_HOME, CUDA_PATH, PATH, "
                "/usr/local/cuda) and no flashinfer-jit-cache", FLASHINFER_FIX)
    return None
