"""Learner -> rollout weight transport.

cpu mode: the learner's parameters live in one flat fp32 buffer backed by a file in /dev/shm, mapped
`shared=True`. The rollout engine maps the same file and points its parameters at views of it, so an optimizer
step is visible to the engine with no bytes moved; a "sync" only publishes the new version number.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

SHM_DIR = Path("/dev/shm") if Path("/dev/shm").is_dir() else None


@dataclass(frozen=True)
class FlatLayout:
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    offsets: tuple[int, ...]  # element offset of each parameter in the flat buffer
    numel: int

    @classmethod
    def of(cls, model: nn.Module) -> "FlatLayout":
        names, shapes, offsets, offset = [], [], [], 0
        # named_parameters() yields a tied parameter once (embed_tokens / lm_head share one slot).
        for name, param in model.named_parameters():
            names.append(name)
            shapes.append(tuple(param.shape))
            offsets.append(offset)
            offset += param.numel()
        return cls(tuple(names), tuple(shapes), tuple(offsets), offset)


@dataclass(frozen=True)
class SharedWeights:
    """What the learner sends to the rollout engine once: where the flat buffer is and how it is laid out."""

    path: str
    layout: FlatLayout
    dtype: torch.dtype = torch.float32


@dataclass(frozen=True)
class ServingHandle:
    """colocated: the learner's flat serving buffer (serving dtype), mapped once by the engine through a CUDA IPC
    handle (a shared-memory file on CPU); the learner refreshes it in place at every sync."""

    handle: bytes  # from share_handle
    layout: FlatLayout
    dtype: torch.dtype


@dataclass(frozen=True)
class BroadcastSpec:
    """split: at every sync the learner (rank 0 of `group`) broadcasts its serving buffer, bucket by bucket, and
    each engine receives it at the same time into a buffer of the same layout."""

    layout: FlatLayout
    dtype: torch.dtype
    buckets: tuple[range, ...]
    group: str


@dataclass(frozen=True)
class WeightUpdate:
    """One sync: the version the learner's weights are at (and, the first time, the handle to map)."""

    version: int
    shared: SharedWeights | None = None  # cpu mode: the fp32 master weights themselves
    serving: ServingHandle | None = None  # colocated mode, hf engine: the serving-dtype copy, mapped once
    # colocated mode, sglang engine: per bucket of the serving buffer, the serialised flattened bucket (CUDA IPC
    # handles, one payload per TP rank), made in the learner's process at every sync
    sglang_buckets: tuple[list[bytes], ...] | None = None
    broadcast: BroadcastSpec | None = None  # split mode: receive the broadcast now


def _map(path: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.from_file(path, shared=True, size=numel, dtype=dtype)


def _bind(model: nn.Module, flat: torch.Tensor, layout: FlatLayout, copy_in: bool) -> None:
    params = dict(model.named_parameters())
    if tuple(params) != layout.names:
        raise ValueError("the engine's model does not have the learner's parameters: load the same student")
    for name, shape, offset in zip(layout.names, layout.shapes, layout.offsets, strict=True):
        param = params[name]
        if tuple(param.shape) != shape:
            raise ValueError(f"parameter {name} has shape {tuple(param.shape)} in the engine, {shape} in the learner")
        view = flat[offset: offset + math.prod(shape)].view(shape)
        if copy_in:
            view.copy_(param.data)
        param.data = view  # the parameter now *is* a window on the shared buffer


def share_parameters(model: nn.Module, name: str) -> SharedWeights:
    """Move `model`'s parameters into a new shared flat buffer (fp32) and return its handle."""
    if SHM_DIR is None:
        raise RuntimeError("the cpu weight transport needs /dev/shm (a Linux shared-memory filesystem)")
    layout = FlatLayout.of(model)
    path = str(SHM_DIR / f"opd-{name}-{os.getpid()}.bin")
    flat = _map(path, layout.numel, torch.float32)
    _bind(model.float(), flat, layout, copy_in=True)
    return SharedWeights(path=path, layout=layout)


def attach_parameters(model: nn.Module, shared: SharedWeights) -> None:
    """Point `model`'s parameters at views of the learner's shared buffer (zero copy)."""
    if not os.path.exists(shared.path):
        raise FileNotFoundError(f"shared weights {shared.path} are gone: the learner that owned them has exited")
    _bind(model.to(shared.dtype), _map(shared.path, shared.layout.numel, shared.dtype), shared.layout,
          copy_in=False)


def release(shared: SharedWeights) -> None:
    """Remove the shared file (mappings that exist stay valid until their processes drop them)."""
    Path(shared.path).unlink(missing_ok=True)


def reclaim_stale() -> list[Path]:
    """Remove the shared-weight files of learners that are gone (a run killed before it could release them: each
    is model-sized, in RAM). A file names its learner's pid; one whose pid lives, or of another user, stays."""
    removed = []
    for f in SHM_DIR.glob("opd-*-*.bin") if SHM_DIR is not None else ():
        pid = f.stem.rpartition("-")[2]
        try:
            if not pid.isdigit() or f.stat().st_uid != os.getuid():
                continue
            os.kill(int(pid), 0)
        except ProcessLookupError:
            f.unlink(missing_ok=True)
            removed.append(f)
        except OSError:  # alive under another user (PermissionError), or the file went meanwhile
            continue
    return removed


# ---------------------------------------------------------------- GPU modes: the serving buffer and its buckets

WEIGHTS_GROUP = "opd-weights"  # split mode: the learner is rank 0, rollout replica i is rank 1 + i
BUCKET_BYTES = 512 << 20  # ~512 MB per update call: per-tensor IPC updates were 4.3x slower (NOTES.md)


def plan_buckets(layout: FlatLayout, *, element_bytes: int, bucket_bytes: int = BUCKET_BYTES) -> list[range]:
    """Consecutive parameter index ranges of at most `bucket_bytes` each (a parameter larger than that is a
    bucket of its own). Consecutive parameters are consecutive in the flat buffer, so a bucket is one slice."""
    buckets, start, size = [], 0, 0
    for i, shape in enumerate(layout.shapes):
        nbytes = math.prod(shape) * element_bytes
        if i > start and size + nbytes > bucket_bytes:
            buckets.append(range(start, i))
            start, size = i, 0
        size += nbytes
    if layout.names:
        buckets.append(range(start, len(layout.names)))
    return buckets


class ServingBuffer:
    """One flat buffer in the serving dtype (bf16 on GPU) laid out like the learner's parameters.

    The learner's fp32 master weights stay separate; after each optimizer step `refresh` casts them into this
    buffer (the one copy a dtype change needs), and the engine maps it (CUDA IPC, same GPU) or receives it by
    broadcast (NCCL, two GPUs) bucket by bucket. A producer buffer must not be rewritten before the consumer's
    update call returned and the device synchronised (SGLang enqueues its copies; NOTES.md).
    """

    def __init__(self, layout: FlatLayout, dtype: torch.dtype, device: torch.device | str = "cpu"):
        self.layout, self.dtype = layout, dtype
        self.flat = torch.empty(layout.numel, dtype=dtype, device=device)
        self._views = [self.flat[offset: offset + math.prod(shape)].view(shape)
                       for offset, shape in zip(layout.offsets, layout.shapes, strict=True)]

    def refresh(self, model: nn.Module) -> None:
        params = [p.detach() for _, p in model.named_parameters()]
        assert len(params) == len(self._views), "the model's parameters changed since the buffer was laid out"
        if not any(hasattr(p, "full_tensor") for p in params):
            torch._foreach_copy_(self._views, params)  # one fused cast-copy launch on GPU
            return
        # sharded (FSDP2 DTensors): every replica calls this at once; one parameter gathered at a time, so the
        # whole fp32 weights never exist beside the buffer
        for view, param in zip(self._views, params, strict=True):
            view.copy_(param.full_tensor())

    def named_views(self) -> list[tuple[str, torch.Tensor]]:
        return list(zip(self.layout.names, self._views, strict=True))

    def bucket(self, indices: range) -> tuple[torch.Tensor, list[tuple[str, torch.Size]]]:
        """The bucket's slice of the flat buffer (a view: zero copy) and its (name, shape) metadata."""
        lo = self.layout.offsets[indices.start]
        last = indices.stop - 1
        hi = self.layout.offsets[last] + math.prod(self.layout.shapes[last])
        return self.flat[lo:hi], [(self.layout.names[i], torch.Size(self.layout.shapes[i])) for i in indices]


def broadcast_buckets(buffer: ServingBuffer, buckets: list[range] | tuple[range, ...], group_name: str, *,
                      process_group=None) -> None:
    """Split mode, both sides of one call: the learner (rank 0) sends its serving buffer bucket by bucket, every
    engine rank receives each bucket straight into its own buffer (an hf engine whose parameters are the
    buffer's views, see `bind_to_buffer`, then holds the new weights with no further copy).

    NCCL on GPUs, gloo on CPU (torch.distributed, opd/transport/groups.py). An NCCL broadcast returns once it is
    enqueued on NCCL's stream: the host waits for it before the buffer is refreshed again.
    `process_group`: a torch.distributed group instead (the learner's end of an sglang weight-update group).
    """
    from opd.transport import groups

    for indices in buckets:
        tensor, _ = buffer.bucket(indices)
        if process_group is not None:  # sglang receives each bucket as the bytes of a FlattenedTensorBucket
            torch.distributed.broadcast(tensor.view(torch.uint8), src=0, group=process_group)
        else:
            groups.get(group_name).broadcast(tensor, src=0)
    if buffer.flat.is_cuda:
        torch.cuda.synchronize(buffer.flat.device)  # host sync: the next refresh may overwrite the buffer


def bind_to_buffer(model: nn.Module, buffer: ServingBuffer) -> None:
    """Point `model`'s parameters at the serving buffer's views (an engine that receives by broadcast)."""
    _bind(model.to(buffer.dtype), buffer.flat, buffer.layout, copy_in=True)


def share_handle(tensor: torch.Tensor) -> bytes:
    """A handle another process on the same machine maps to the same memory: a CUDA IPC handle for a GPU tensor
    (colocated mode: the flat serving buffer, sent once), a shared-memory file name for a CPU tensor. The same
    serialisation sglang's `MultiprocessingSerializer` uses. The producer must keep `tensor` alive."""
    import io

    import torch.multiprocessing as mp
    from multiprocessing.reduction import ForkingPickler  # torch registers its tensor reductions on it

    if not tensor.is_cuda:
        # file names survive any transport (Ray's object store included); fds would need multiprocessing's
        # own connection to be passed.
        mp.set_sharing_strategy("file_system")
    buf = io.BytesIO()
    ForkingPickler(buf).dump(tensor)
    return buf.getvalue()


def open_handle(handle: bytes) -> torch.Tensor:
    """The tensor behind `share_handle`'s bytes, mapped (not copied) into this process."""
    import torch.multiprocessing as mp
    from multiprocessing.reduction import ForkingPickler  # torch registers its tensor reductions on it

    mp.set_sharing_strategy("file_system")
    return ForkingPickler.loads(handle)


def attach_serving(model: nn.Module, serving: ServingHandle) -> None:
    """Point `model`'s parameters at views of the learner's serving buffer (zero copy, same device)."""
    flat = open_handle(serving.handle)
    # Bind first, then move what is left (the buffers): the parameters go straight from wherever they were loaded
    # to views of the buffer, so no second copy of the weights is ever made on the device.
    _bind(model, flat, serving.layout, copy_in=False)
    model.to(device=flat.device)


# ---------------------------------------------------------------- the routes: one object per way the weights travel


class WeightRoute:
    """How the learner's weights reach the rollout engines; one object, chosen once from mode, engine, device and
    replicas (opd/modes.py `weight_route`), that the learner (`setup`, `export`, `broadcast`, `release`) and the
    rollout actor (`load`, and how it loads its own copy: `engine_dtype`, `engine_on_host`) call alike."""

    broadcasts = False  # the bytes follow the update: the learner's `broadcast` runs beside the engines' `load`
    engine_dtype: str | None = None  # the dtype the engine loads the student in ("float32"; None: model.dtype)
    engine_on_host = False  # the engine's parameters become views of the learner's buffer straight from host memory

    def __init__(self, dtype: torch.dtype = torch.float32):
        self.dtype, self.shared, self.serving, self.buckets = dtype, None, None, ()

    def setup(self, model: nn.Module, device: torch.device, name: str) -> None:
        """The learner's side, once: its buffer in the serving dtype, laid out like `model`, and its bucket plan."""
        self.serving = ServingBuffer(FlatLayout.of(model), self.dtype, device=device)
        self.buckets = tuple(plan_buckets(self.serving.layout, element_bytes=self.serving.flat.element_size()))

    def export(self, model: nn.Module, version: int, first: bool) -> WeightUpdate:
        """The update of one sync (`first`: the first one, or one for an engine that was restarted)."""
        self.serving.refresh(model)  # the one cast copy: fp32 master -> serving dtype, in place
        if self.serving.flat.is_cuda:
            torch.cuda.synchronize(self.serving.flat.device)  # other processes read the buffer next
        return self._update(version, first)

    def _update(self, version: int, first: bool) -> WeightUpdate:
        raise NotImplementedError

    def broadcast(self, process_group=None) -> None:
        pass

    def load(self, engine, update: WeightUpdate) -> int:
        """The rollout's side: the engine takes the update; returns the version it holds."""
        return engine.load_weights(update)

    def release(self) -> None:
        pass


class SharedMasterRoute(WeightRoute):
    """cpu mode, one learner: the engine maps the learner's fp32 master weights themselves (one /dev/shm file);
    the optimizer step is the update, a sync only publishes the version."""

    engine_dtype = "float32"

    def setup(self, model: nn.Module, device: torch.device, name: str) -> None:
        self.shared = share_parameters(model, name)

    def export(self, model: nn.Module, version: int, first: bool) -> WeightUpdate:
        return WeightUpdate(version, shared=self.shared if first else None)

    def release(self) -> None:
        release(self.shared)


class MappedServingRoute(WeightRoute):
    """colocated mode with the hf engine (a CUDA IPC handle), and cpu mode with sharded learners (a shared-memory
    file): the engine maps the learner's serving buffer once; each sync refreshes it in place."""

    engine_on_host = True  # the parameters go from host memory straight to views of the buffer: no second copy

    def __init__(self, dtype: torch.dtype = torch.float32):
        super().__init__(dtype)
        self.engine_dtype = "float32" if dtype == torch.float32 else None

    def _update(self, version: int, first: bool) -> WeightUpdate:
        handle = ServingHandle(share_handle(self.serving.flat), self.serving.layout, self.serving.dtype) if first else None
        return WeightUpdate(version, serving=handle)


class SGLangIPCRoute(WeightRoute):
    """colocated mode with sglang: per bucket of the serving buffer, fresh CUDA IPC handles at every sync (sglang
    releases each one it opened) through `update_weights_from_tensor(load_format="flattened_bucket")`. The buffer
    never moves, and is not rewritten before the next sync, after the engine has generated with these weights."""

    def _update(self, version: int, first: bool) -> WeightUpdate:
        import torch.multiprocessing as mp

        from opd.transport.sglang_weights import encode_flattened_bucket

        if not self.serving.flat.is_cuda:  # run.device=cpu: shared-memory file names, which sglang's scheduler
            mp.set_sharing_strategy("file_system")  # can open; fds would need this process's resource sharer
        views = self.serving.named_views()
        return WeightUpdate(version, sglang_buckets=tuple(encode_flattened_bucket(views[b.start:b.stop], 1)
                                                          for b in self.buckets))

    def load(self, engine, update: WeightUpdate) -> int:
        from opd.transport.sglang_weights import TensorBucketUpdate

        return engine.load_weights(TensorBucketUpdate(update.version, buckets=update.sglang_buckets))


class BroadcastRoute(WeightRoute):
    """split mode, hf engines: the learner (rank 0 of WEIGHTS_GROUP) broadcasts its serving buffer bucket by bucket
    while every engine receives it into a buffer its parameters are views of (NCCL; gloo on CPU)."""

    broadcasts = True

    def _update(self, version: int, first: bool) -> WeightUpdate:
        return WeightUpdate(version, broadcast=BroadcastSpec(self.serving.layout, self.serving.dtype, self.buckets,
                                                             WEIGHTS_GROUP))

    def broadcast(self, process_group=None) -> None:
        broadcast_buckets(self.serving, self.buckets, WEIGHTS_GROUP, process_group=process_group)


class SGLangBroadcastRoute(BroadcastRoute):
    """split mode, sglang engines: the same broadcast over the torch.distributed group sglang opened (the learner
    passes its end), received by `update_weights_from_distributed(load_format="flattened_bucket")`."""

    def load(self, engine, update: WeightUpdate) -> int:
        from opd.transport.sglang_weights import DistributedUpdate

        spec = update.broadcast
        layout = spec.layout
        return engine.load_weights(DistributedUpdate(
            update.version, names=layout.names, dtypes=[spec.dtype] * len(layout.names), shapes=layout.shapes,
            group_name=spec.group, load_format="flattened_bucket", bucket_sizes=[len(b) for b in spec.buckets]))
