"""Real model shapes with random weights, for benchmarks that need no download.

`assets/shapes/` holds the published `config.json` of the anchors' models (Qwen2.5-1.5B/7B-Instruct,
Qwen3-1.7B/8B). `build_pair` turns a pair into two model folders that the actors load like any other: the
config (optionally with fewer layers or another vocabulary size, for CPU-sized runs), a synthetic tokenizer of
the pair's real size, and a `random_weights.json` marker instead of weights. `actors.common.load` sees the
marker and builds the model from its config with seeded random weights (`random_model`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from opd.config import ConfigError, resolve_path

SHAPES_DIR = "assets/shapes"
RANDOM_WEIGHTS = "random_weights.json"
# name -> (student config, teacher config, tokenizer size). The output rows (151936, 152064) exceed the
# tokenizer: Qwen2.5's has 151,643 regular and 22 special tokens, Qwen3's 4 more (<think>, </think>,
# <tool_response>, </tool_response>). Rows beyond the tokenizer are padding, masked to -inf by the losses.
SHAPE_PAIRS: dict[str, tuple[str, str, int]] = {
    "qwen25_1p5b_7b": ("qwen2.5-1.5b-instruct", "qwen2.5-7b-instruct", 151665),
    "qwen3_1p7b_8b": ("qwen3-1.7b", "qwen3-8b", 151669),
}
PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"  # ids 0, 1, 2 of the synthetic tokenizer


def shape_config(name: str) -> dict:
    return json.loads((resolve_path(SHAPES_DIR) / f"{name}.json").read_text())


def synthetic_tokenizer(size: int):
    """A word-level tokenizer with `size` tokens (`<pad>`, `<eos>`, `<unk>`, then `t3` ... ): the benchmark
    works on token ids, so only the vocabulary size and the special ids matter. (transformers loads it as
    Qwen2Tokenizer for a qwen2 config, whatever the folder says; ids and specials survive, text encoding not.)"""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {PAD: 0, EOS: 1, UNK: 2, **{f"t{i}": i for i in range(3, size)}}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD, eos_token=EOS, unk_token=UNK,
                                   padding_side="left", model_max_length=1 << 20)


def save_synthetic_tokenizer(out_dir: Path, size: int) -> None:
    from opd.models import save_tokenizer  # transformers, imported when a folder is written

    save_tokenizer(synthetic_tokenizer(size), out_dir)


def write_model_folder(out_dir: Path, config: dict, tokenizer_size: int, *, num_layers: int = 0,
                       vocab_size: int = 0) -> Path:
    """A model folder with `config` (its first `num_layers` layers, `vocab_size` output rows when given), the
    synthetic tokenizer and the random-weights marker; returns the folder."""
    config = dict(config)
    if num_layers:
        config["num_hidden_layers"] = min(num_layers, config["num_hidden_layers"])
        if isinstance(config.get("max_window_layers"), int):
            config["max_window_layers"] = min(config["max_window_layers"], config["num_hidden_layers"])
    if vocab_size:
        config["vocab_size"] = vocab_size
    config.update(bos_token_id=None, eos_token_id=1, pad_token_id=0)  # the synthetic tokenizer's ids
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_synthetic_tokenizer(out_dir, tokenizer_size)
    (out_dir / RANDOM_WEIGHTS).write_text(json.dumps({"tokenizer_size": tokenizer_size}) + "\n")
    return out_dir


def build_pair(name: str, out_dir: Path, *, num_layers: int = 0, vocab_size: int = 0) -> tuple[Path, Path]:
    """`out_dir/student` and `out_dir/teacher` for a pair of SHAPE_PAIRS (random weights, no download)."""
    if name not in SHAPE_PAIRS:
        raise ConfigError(f"bench.shapes={name!r} is unknown: use one of {', '.join(SHAPE_PAIRS)}")
    student, teacher, tokenizer_size = SHAPE_PAIRS[name]
    if vocab_size:
        tokenizer_size = min(tokenizer_size, vocab_size)
    return tuple(write_model_folder(out_dir / side, shape_config(shape), tokenizer_size, num_layers=num_layers,
                                    vocab_size=vocab_size)
                 for side, shape in (("student", student), ("teacher", teacher)))


def is_random(folder: str | Path) -> bool:
    return (Path(folder) / RANDOM_WEIGHTS).is_file()


def random_model(folder: str | Path, *, dtype: torch.dtype, attn_implementation: str | None = None,
                 seed: int = 0):
    """The model of `folder`'s config with seeded random weights (transformers' own initialisation)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(folder))
    kwargs = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    torch.manual_seed(seed)  # the learner and the rollout engine build the same student
    return AutoModelForCausalLM.from_config(config, dtype=dtype, **kwargs)
