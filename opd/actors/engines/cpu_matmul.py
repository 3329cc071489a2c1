"""The CPU decode loop's matmuls: a decode step's projections have one row per sequence, and which of torch's
matmuls is fastest for such a shape differs between CPUs, so the engine times the candidate paths once per shape
on the machine it runs on (`tune`) and keeps the fastest."""

from __future__ import annotations

import contextlib
import functools
import logging
import statistics
import time

import torch

logger = logging.getLogger(__name__)

# A decode step's projections have one row per sequence, and which of torch's matmuls is fastest for such a shape
# differs between CPUs. One thread, the side-by-side student's head (2 rows, 256 -> 32768): MKL's `x @ w.T` 8.6 ms
# and `w @ x.T` 2.0 on one of this project's machines, 1.2 and 2.1 on another; its 14 layer projections 1.1 vs
# 0.46 ms on the first (MKL's 2-row path reads weights the head has pushed out of the caches at ~5 GB/s), 0.30 vs
# 0.58 on the second. So the engine times the candidates once per shape on the machine it runs on
# (`tune`) and keeps the fastest; weights under TUNE_MIN_BYTES (the toy models: timing noise,
# nothing to gain) take the fixed rule `fixed_path`, the first machine's choice.
FEW_ROWS = 4
ONEDNN_MIN_INPUTS, ONEDNN_MAX_ROWS = 2048, 64
_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
TUNE_MIN_BYTES = 128 * 1024
TUNE_MARGIN = 0.1  # another path replaces the fixed rule's only if it is this much faster (noise keeps the rule)
TUNE_REPEATS = 5


def fixed_path(rows: int, inputs: int, dtype: torch.dtype, *, head: bool = False) -> str:
    """The fixed rule: oneDNN's linear for long rows (1.5-2.2x MKL's at 2048-6144 inputs on the first machine;
    level at 576-1536), `w @ x.T` by columns for up to FEW_ROWS short rows (any number for the head), else
    MKL's `x @ w.T`."""
    if _ONEDNN and inputs >= ONEDNN_MIN_INPUTS and rows <= ONEDNN_MAX_ROWS and dtype == torch.float32:
        return "onednn"
    return "columns" if head or rows <= FEW_ROWS else "linear"


def candidate_paths(rows: int, dtype: torch.dtype, *, head: bool = False) -> list[str]:
    paths = ["linear"]
    if head or rows <= FEW_ROWS:
        paths.append("columns")
    if _ONEDNN and rows <= ONEDNN_MAX_ROWS and dtype == torch.float32:
        paths.append("onednn")
    return paths


def cpu_project(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, *,
                path: str | None = None) -> torch.Tensor:
    """`x @ w.T + bias` for `x [rows, in]` on the CPU by `path`: "linear" (MKL's `x @ w.T`), "columns" (`w @ x.T`,
    a column at a time), "onednn" (oneDNN's linear); None: `fixed_path`."""
    path = path or fixed_path(*x.shape, x.dtype)
    if path == "onednn":
        return onednn_linear(x, w, bias)
    if path == "linear":
        return torch.nn.functional.linear(x, w, bias)
    y = torch.stack((w @ x.T).unbind(1))  # `[rows, out]`: a column at a time (a transposing copy: ~4x slower)
    return y if bias is None else y.add_(bias)


def time_paths(run, paths: list[str], *, repeats: int = TUNE_REPEATS, evict: torch.Tensor | None = None
               ) -> dict[str, float]:
    """The median seconds of `run(path)` for each path, the paths interleaved, each run after reading `evict`
    (so the weights come from memory, as in the loop, where the head pushes them out of the caches)."""
    for path in paths:  # warm up (oneDNN builds its primitive, MKL its buffers)
        run(path)
    times: dict[str, list[float]] = {path: [] for path in paths}
    for _ in range(repeats):
        for path in paths:
            if evict is not None:
                evict.sum()
            start = time.perf_counter()
            run(path)
            times[path].append(time.perf_counter() - start)
    return {path: statistics.median(t) for path, t in times.items()}


def pick_path(times: dict[str, float], default: str, *, margin: float = TUNE_MARGIN) -> str:
    """The fastest path, if it beats `default` by more than `margin`; else `default`."""
    fastest = min(times, key=times.__getitem__)
    return fastest if times[fastest] < (1.0 - margin) * times[default] else default


@torch.library.custom_op("opd::onednn_linear", mutates_args=())
def onednn_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """oneDNN's linear on an unpacked weight, as an operator torch.compile calls rather than lowers (inductor's
    lowering of `mkldnn._linear_pointwise` expects a weight it packed itself)."""
    return torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", [], "")


@onednn_linear.register_fake
def _(x, w, bias):
    return x.new_empty(x.shape[0], w.shape[0])


def path_key(rows: int, module: torch.nn.Linear) -> tuple[int, int, int, bool]:
    """What a projection's path depends on: rows, its weight's shape, whether it adds a bias."""
    return rows, module.weight.shape[0], module.weight.shape[1], module.bias is not None


def few_rows_linear(module: torch.nn.Linear, paths: dict[tuple[int, int, int, bool], str],
                    x: torch.Tensor) -> torch.Tensor:
    """`module(x)` by `cpu_project` (any leading dimensions), on the path `paths` holds for the shape (else the
    fixed rule)."""
    x2 = x.reshape(-1, x.shape[-1])
    y = cpu_project(x2, module.weight, module.bias, path=paths.get(path_key(x2.shape[0], module)))
    return y.view(*x.shape[:-1], -1)


@contextlib.contextmanager
def few_row_projections(forwards: dict[torch.nn.Linear, functools.partial]):
    """For the duration: each `nn.Linear` projection uses its `few_rows_linear` (an instance attribute over the
    class's forward, removed on exit; the parameters are untouched)."""
    for module, forward in forwards.items():
        module.forward = forward
    try:
        yield
    finally:
        for module in forwards:
            del module.forward


def head_rows(w: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """`h @ w.T` for a few rows `h [B, d]` written as a reduction over `d`, for torch.compile: the kernel inductor
    makes reads each row of `w` once for all B rows. One thread, 32768 rows: 1.3 ms against `w @ h.T`'s 1.8 at
    d = 256 with 2 rows (the side-by-side student), 11 vs 17 ms at 1024 with 4, level at 576, on the first machine;
    at 2048 oneDNN's linear was faster (21 vs 30 ms). `tune` times it against the eager paths. Compiled alone:
    inside the decoder's graph it would fuse with the final norm and recompute it for every row of `w`."""
    return (w[:, None, :] * h[None]).sum(-1).T.contiguous()


@torch.no_grad()
def tune(rows: int, layers: list[torch.nn.Linear], head: torch.Tensor, compiled_head=None
         ) -> tuple[dict[tuple[int, int, int, bool], str], tuple[str, str] | None]:
    """Time `cpu_project`'s paths for every projection shape of `rows` rows whose weight has at least
    TUNE_MIN_BYTES (up to 4 of the layers of each shape, weights read from memory) and for the output head `head`
    (also `compiled_head`, rollout.compile's `head_rows`, as "reduction", for up to FEW_ROWS rows). Returns
    `path_key -> path` and the head's `(prefill path, decode path)` (the prefill is not compiled: the fastest eager
    one), None for a head too small to time. A few seconds at most (the side-by-side student: ~0.5 s)."""
    groups: dict[tuple[int, int, int, bool], list[torch.nn.Linear]] = {}
    for m in layers:
        w = m.weight
        if w.device.type == "cpu" and w.numel() * w.element_size() >= TUNE_MIN_BYTES:
            groups.setdefault(path_key(rows, m), []).append(m)
    evict = torch.ones(1 << 24)  # 64 MiB, more than the caches hold
    g = torch.Generator().manual_seed(0)
    paths = {}
    for key, modules in groups.items():
        w = modules[0].weight
        x = torch.randn(rows, w.shape[1], generator=g).to(w.dtype)
        some = modules[:4]
        times = time_paths(lambda path: [cpu_project(x, m.weight, m.bias, path=path) for m in some],
                           candidate_paths(rows, w.dtype), evict=evict)
        paths[key] = pick_path(times, fixed_path(rows, w.shape[1], w.dtype))
    if head.device.type != "cpu" or head.numel() * head.element_size() < TUNE_MIN_BYTES:
        return paths, None
    h = torch.randn(rows, head.shape[1], generator=g).to(head.dtype)
    times = time_paths(lambda path: cpu_project(h, head, path=path), candidate_paths(rows, head.dtype, head=True),
                       evict=evict)
    eager = decode = pick_path(times, fixed_path(rows, head.shape[1], head.dtype, head=True))
    if compiled_head is not None and rows <= FEW_ROWS:
        times = {eager: times[eager], **time_paths(lambda path: compiled_head(head, h), ["reduction"], evict=evict)}
        decode = pick_path(times, eager)
    logger.info("CPU decode paths for %d rows: head %s (prefill %s); %s", rows, decode, eager,
                ", ".join(f"{o}x{i} {p}" for (_, o, i, _), p in paths.items()))
    return paths, (eager, decode)
