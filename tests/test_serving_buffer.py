"""GPU-mode weight layout, tested on CPU: bucket planning and the flat serving buffer's zero-copy views."""

import torch
from transformers import AutoModelForCausalLM

from opd.transport.weights import FlatLayout, ServingBuffer, plan_buckets


def _model(root):
    return AutoModelForCausalLM.from_pretrained(root / "assets/toy/teacher", dtype=torch.float32)


def test_buckets_cover_every_parameter_once_in_order_within_the_bound(root):
    layout = FlatLayout.of(_model(root))
    bound = 64 * 1024
    buckets = plan_buckets(layout, element_bytes=2, bucket_bytes=bound)
    assert [i for b in buckets for i in b] == list(range(len(layout.names)))
    assert len(buckets) > 1
    for b in buckets:
        sizes = [2 * torch.Size(layout.shapes[i]).numel() for i in b]
        assert sum(sizes) <= bound or len(sizes) == 1  # only a single oversized parameter may exceed it
    assert plan_buckets(layout, element_bytes=2, bucket_bytes=1 << 40) == [range(len(layout.names))]


def test_serving_buffer_is_the_cast_master_weights_and_buckets_are_views(root):
    model = _model(root)
    layout = FlatLayout.of(model)
    buffer = ServingBuffer(layout, torch.bfloat16)
    buffer.refresh(model)
    for (name, view), (name2, p) in zip(buffer.named_views(), model.named_parameters(), strict=True):
        assert name == name2 and view.dtype == torch.bfloat16 and torch.equal(view, p.detach().bfloat16())
    flat_ptr = buffer.flat.untyped_storage().data_ptr()
    total = 0
    for b in plan_buckets(layout, element_bytes=2, bucket_bytes=128 * 1024):
        tensor, meta = buffer.bucket(b)
        assert tensor.untyped_storage().data_ptr() == flat_ptr  # a slice of the one buffer, not a copy
        assert tensor.numel() == sum(s.numel() for _, s in meta)
        total += tensor.numel()
    assert total == layout.numel
    with torch.no_grad():
        model.model.norm.weight.add_(1.0)  # an optimizer step on the fp32 master ...
    buffer.refresh(model)  # ... reaches the serving buffer on refresh
    assert torch.equal(dict(buffer.named_views())["model.norm.weight"], model.model.norm.weight.detach().bfloat16())
