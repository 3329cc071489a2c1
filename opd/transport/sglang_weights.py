"""Learner -> sglang weight updates: the messages sglang's engine takes (`update_weights_from_tensor` in colocated
mode, `update_weights_from_distributed` in split mode) and the flattened bucket, laid out as sglang lays it out,
without a copy when the tensors are consecutive views of one buffer. Checked against sglang 0.5.23
(tests/test_sglang_adapter.py); sglang itself is imported only to serialise a bucket, on the GPU side."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

# the fields of sglang's FlattenedTensorMetadata (sglang/srt/weight_sync/tensor_bucket.py)
BUCKET_METADATA_FIELDS = ("name", "shape", "dtype", "start_idx", "end_idx", "numel")
LOAD_FORMATS = (None, "direct", "flattened_bucket")

Bucket = Sequence[tuple[str, torch.Tensor]] | Sequence[bytes | str]


@dataclass(frozen=True)
class TensorBucketUpdate:
    """One sync through `update_weights_from_tensor` (colocated mode: same GPU, CUDA IPC), one call per bucket.

    A bucket is either named tensors (the adapter flattens and serialises them in its own process; zero copy
    when they are consecutive views of one buffer, as `ServingBuffer.named_views` gives) or, for
    `flattened_bucket`, the payloads a producer already serialised, one per TP rank (CUDA IPC handles made in
    the learner's process: the tensors never cross Ray). The producer must not rewrite the memory before
    `load_weights` returned and its device synchronised: sglang returns after enqueueing the copies.
    """

    version: int
    buckets: Sequence[Bucket]
    load_format: str | None = "flattened_bucket"

    def __post_init__(self):
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(f"TensorBucketUpdate.load_format={self.load_format!r}: use one of {LOAD_FORMATS}")
        if not self.buckets or any(len(b) == 0 for b in self.buckets):
            raise ValueError("TensorBucketUpdate.buckets: every update needs at least one non-empty bucket")


@dataclass(frozen=True)
class DistributedUpdate:
    """One sync through `update_weights_from_distributed` (split mode: the learner broadcasts over NCCL while
    the engine receives). `load_format="flattened_bucket"` receives the tensors as one broadcast buffer."""

    version: int
    names: Sequence[str]
    dtypes: Sequence[str | torch.dtype]
    shapes: Sequence[Sequence[int]]
    group_name: str
    load_format: str | None = None
    # consecutive runs of `names` received one call (one broadcast, with flattened_bucket) each; None: one call
    bucket_sizes: Sequence[int] | None = None

    def __post_init__(self):
        if not len(self.names) == len(self.dtypes) == len(self.shapes) > 0:
            raise ValueError(f"DistributedUpdate: names, dtypes, shapes must be non-empty and equally long, got "
                             f"{len(self.names)}, {len(self.dtypes)}, {len(self.shapes)}")
        if self.bucket_sizes is not None and (sum(self.bucket_sizes) != len(self.names)
                                              or min(self.bucket_sizes) < 1):
            raise ValueError(f"DistributedUpdate.bucket_sizes {list(self.bucket_sizes)} must be positive and add "
                             f"up to the {len(self.names)} names")
        if self.load_format not in (None, "flattened_bucket"):
            raise ValueError(f"DistributedUpdate.load_format={self.load_format!r}: use None or 'flattened_bucket'")

    def calls(self) -> list[slice]:
        sizes = self.bucket_sizes or [len(self.names)]
        ends = list(itertools.accumulate(sizes))
        return [slice(end - size, end) for size, end in zip(sizes, ends, strict=True)]


def flatten_bucket(named_tensors: Sequence[tuple[str, torch.Tensor]], metadata_cls: Callable[..., Any]):
    """`(flat uint8 tensor, [metadata])` laid out as sglang's `FlattenedTensorBucket(named_tensors=...)` does
    (byte offsets, `numel` counted in bytes), without its copy when the tensors are consecutive views of one
    storage: the flat tensor is then a byte view of that storage. sglang views each slice as its dtype, so
    every offset must be a multiple of that dtype's size (its own constructor does not check this)."""
    tensors = [t.detach() for _, t in named_tensors]
    nbytes = [t.numel() * t.element_size() for t in tensors]
    first = tensors[0]
    consecutive = all(t.is_contiguous() and t.device == first.device
                      and t.untyped_storage().data_ptr() == first.untyped_storage().data_ptr() for t in tensors)
    consecutive = consecutive and all(a.data_ptr() + n == b.data_ptr()
                                      for a, b, n in zip(tensors, tensors[1:], nbytes, strict=False))
    if consecutive:
        flat = torch.empty(0, dtype=torch.uint8, device=first.device)
        flat.set_(first.untyped_storage(), first.storage_offset() * first.element_size(), (sum(nbytes),))
    else:
        flat = torch.cat([t.contiguous().reshape(-1).view(torch.uint8) for t in tensors])
    metadata, start = [], 0
    for (name, t), n in zip(named_tensors, nbytes, strict=True):
        if start % t.element_size():  # the receiver views its bytes as t.dtype, which needs aligned offsets
            raise ValueError(f"bucket tensor {name} ({t.dtype}) starts at byte {start}, not a multiple of "
                             f"{t.element_size()}: order a bucket's tensors by decreasing element size")
        metadata.append(metadata_cls(name=name, shape=t.shape, dtype=t.dtype, start_idx=start, end_idx=start + n,
                                     numel=n))
        start += n
    return flat, metadata


def encode_flattened_bucket(named_tensors: Sequence[tuple[str, torch.Tensor]], tp_size: int) -> list[bytes]:
    """The `named_tensors` argument sglang expects with `load_format="flattened_bucket"`: one serialised
    `{"flattened_tensor", "metadata"}` per TP rank (CUDA tensors travel as IPC handles). Serialised once per
    rank, as sglang itself does, so each rank's handle reference is released by that rank alone."""
    from sglang.srt.utils.common import MultiprocessingSerializer  # GPU side only
    from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorMetadata

    flat, metadata = flatten_bucket(named_tensors, FlattenedTensorMetadata)
    payload = {"flattened_tensor": flat, "metadata": metadata}
    return [MultiprocessingSerializer.serialize(payload) for _ in range(tp_size)]
