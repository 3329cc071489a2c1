"""What a GPU test needs, checked so that a broken GPU machine fails instead of skipping: without CUDA the test
skips (this is not a GPU machine); with CUDA, a dependency that is missing where it is required, or installed but
does not import (a cupy for the wrong CUDA, a torch without NCCL), fails with the reason and the fix."""

from __future__ import annotations

import importlib
import importlib.util

import pytest
import torch

FIX = "pip install -e '.[gpu]' (then python -m opd.programs.doctor --gpu)"


def cuda(gpus: int = 1) -> None:
    """Skip unless this machine has `gpus` CUDA devices."""
    if not torch.cuda.is_available():
        pytest.skip(f"needs {gpus} CUDA GPU" + ("s" if gpus > 1 else ""), allow_module_level=True)
    if torch.cuda.device_count() < gpus:
        pytest.skip(f"needs {gpus} CUDA GPUs, this machine has {torch.cuda.device_count()}", allow_module_level=True)


def needs(module: str, *, required: bool = True, why: str = ""):
    """`module`, imported, on a CUDA machine (skip without CUDA). Installed but broken: fail. Not installed: fail
    when `required` (a dependency of the GPU modes), skip otherwise (an optional one, or one the test's own
    machine may lack, like Ray on a bare GPU box)."""
    cuda()
    if importlib.util.find_spec(module) is None:
        message = f"{module} is not installed{': ' + why if why else ''}"
        if required:
            pytest.fail(f"{message}; it is a GPU dependency: {FIX}", pytrace=False)
        pytest.skip(message, allow_module_level=True)
    try:
        return importlib.import_module(module)
    except Exception as e:  # what a broken install raises varies: ImportError, OSError, RuntimeError...
        pytest.fail(f"{module} is installed but does not import ({type(e).__name__}: {e}); {FIX}", pytrace=False)


def nccl() -> None:
    """torch's NCCL, which the split mode's groups use (opd/transport/groups.py)."""
    cuda()
    if not torch.distributed.is_nccl_available():
        pytest.fail(f"this torch ({torch.__version__}) has no NCCL, which split mode needs: {FIX}", pytrace=False)
