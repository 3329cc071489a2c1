"""Layer pruning, the student's initialisation: a model with evenly spaced decoder layers of its source kept.

``kept_layer_indices`` picks the layers (first and last included), ``pruned_config`` restricts the per-layer
settings to them, ``prune_layers`` builds the pruned model with exact copies of the kept layers.
"""

from __future__ import annotations

import copy

import torch
from transformers import PretrainedConfig, PreTrainedModel

from opd.models import ModelError


def kept_layer_indices(num_layers: int, num_keep: int) -> list[int]:
    """``num_keep`` of ``num_layers`` decoder layer indices, evenly spaced, the first and the last included.

    Index ``i`` of the kept list is ``round(i * (num_layers - 1) / (num_keep - 1))`` (halves round up); the step
    is >= 1 whenever ``num_keep <= num_layers``, so the indices are distinct and increasing.
    """
    if not 2 <= num_keep <= num_layers:
        raise ModelError(f"cannot keep {num_keep} of {num_layers} layers: keep between 2 (the first and the last) "
                         f"and {num_layers}")
    span, steps = num_layers - 1, num_keep - 1
    return [(2 * i * span + steps) // (2 * steps) for i in range(num_keep)]  # integer round-half-up


def _decoder_layers_prefix(model: PreTrainedModel) -> tuple[str, int]:
    layers = getattr(model.get_decoder(), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ModelError(f"{type(model).__name__} has no decoder.layers ModuleList: layer pruning supports "
                         f"Llama/Qwen-style decoders")
    name = next(n for n, m in model.named_modules() if m is layers)
    return f"{name}.", len(layers)


def pruned_config(config: PretrainedConfig, kept: list[int]) -> PretrainedConfig:
    """``config`` with ``num_hidden_layers = len(kept)`` and its per-layer settings restricted to ``kept``.

    Per-layer settings are list attributes whose name contains "layer" and whose length is the layer count
    (``layer_types``, SmolLM3's ``no_rope_layers``, ...); ``max_window_layers`` (Qwen2/3: layers below it slide)
    becomes the number of kept layers below it. A "layer" list of any other length (a list of layer indices) is
    refused rather than guessed at.
    """
    num_layers = config.num_hidden_layers
    new = copy.deepcopy(config)
    for key, value in vars(config).items():
        if "layer" not in key or not isinstance(value, (list, tuple)) or not value:
            continue
        if len(value) != num_layers:
            raise ModelError(f"config.{key} has {len(value)} entries for {num_layers} layers: pruning does not know "
                             f"how to restrict it; prune a model without it")
        setattr(new, key, type(value)(value[i] for i in kept))
    if isinstance(getattr(config, "max_window_layers", None), int):
        new.max_window_layers = sum(i < config.max_window_layers for i in kept)
    new.num_hidden_layers = len(kept)
    return new


@torch.no_grad()
def prune_layers(model: PreTrainedModel, num_keep: int) -> tuple[PreTrainedModel, list[int]]:
    """A new model of the same class with ``num_keep`` evenly spaced decoder layers (``kept_layer_indices``),
    each an exact copy of the source layer, plus the source's embeddings, final norm and output head.

    Returns ``(pruned_model, kept_indices)``; ``model`` is not modified.
    """
    prefix, num_layers = _decoder_layers_prefix(model)
    kept = kept_layer_indices(num_layers, num_keep)
    pruned = type(model)(pruned_config(model.config, kept)).to(model.dtype)
    source_state = model.state_dict()

    def source_key(key: str) -> str:
        if not key.startswith(prefix):
            return key
        index, rest = key[len(prefix):].split(".", 1)
        return f"{prefix}{kept[int(index)]}.{rest}"

    pruned.load_state_dict({key: source_state[source_key(key)] for key in pruned.state_dict()}, strict=True)
    pruned.generation_config = copy.deepcopy(model.generation_config)
    pruned.eval()
    return pruned, kept
