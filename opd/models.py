"""Model and tokenizer folders: loading (a local Hugging Face folder or a hub id) and saving a tokenizer.

* ``load_tokenizer`` / ``load_model``: every failure is one ``ModelError`` line that names the problem and the fix;
* ``weights_disagree``: whether a folder's safetensors are the tensors its config.json describes (before Ray starts);
* ``save_tokenizer``: a tokenizer folder that transformers 4 and 5 both load (the toy, shapes and SmolLM2 assets).

The student/teacher check is opd/compatibility.py, layer pruning opd/pruning.py, the SmolLM2 assets opd/smollm2.py.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from opd.config import resolve_path

logger = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelError(ValueError):
    """A model or tokenizer that cannot be used: one line that names the problem and the fix."""


# owner/name or name: what the hub accepts as a repository id (no "..", no "--", no leading "." or "/").
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def quiet_transformers() -> None:
    """No per-actor progress bars or info chatter on the driver's console (Ray forwards actor output)."""
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def model_source(name: str) -> str:
    """A model setting as transformers takes it: the project-relative folder if it exists, else the hub id."""
    path = resolve_path(name)
    return str(path) if path.exists() else name


def _source(path_or_id: str) -> str:
    """A local folder (as given, else relative to the project root like every config path) or a hub id."""
    path = Path(path_or_id).expanduser()
    for candidate in (path, resolve_path(path_or_id)):
        if candidate.is_dir():
            return str(candidate)
    if path.exists() or not _HUB_ID.match(path_or_id) or ".." in path_or_id or "--" in path_or_id:
        raise ModelError(f"{path_or_id}: no such model folder; give a local Hugging Face folder (config.json, "
                         f"weights, tokenizer) or a hub id like 'org/name'")
    return path_or_id  # a hub id: transformers resolves it (from its cache when offline)


def _first_line(error: BaseException, limit: int = 200) -> str:
    line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return line if len(line) <= limit else line[:limit] + "..."


def load_tokenizer(path_or_id: str):
    """The tokenizer of a model folder or hub id, with a pad token.

    A tokenizer without a pad token gets eos as pad (with a warning): padding is masked everywhere it occurs, so
    the choice only has to be a valid id; but it is stated, not hidden, because a template that treats eos
    specially would see it.
    """
    source = _source(path_or_id)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load a tokenizer from {path_or_id!r} ({_first_line(e)}): give a Hugging Face "
                         f"folder with tokenizer files, or a hub id that is cached or reachable") from e
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelError(f"the tokenizer of {path_or_id!r} has neither a pad nor an eos token: set one in "
                             f"its tokenizer_config.json")
        logger.warning("tokenizer of %s has no pad token: using its eos token %r as pad", path_or_id,
                       tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path_or_id: str, *, dtype: str = "float32", attn_implementation: str | None = None,
               device: str = "cpu") -> PreTrainedModel:
    """An ``AutoModelForCausalLM`` with weights in ``dtype`` (float32 / bfloat16 / float16) on ``device``."""
    if dtype not in DTYPES:
        raise ModelError(f"dtype={dtype!r} is unknown: use one of {', '.join(DTYPES)}")
    try:
        torch_device = torch.device(device)
    except RuntimeError as e:
        raise ModelError(f"device={device!r} is not a torch device ({_first_line(e)}): use cpu, cuda or cuda:N") from e
    source = _source(path_or_id)
    kwargs = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=DTYPES[dtype], **kwargs)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load a causal LM from {path_or_id!r} ({_first_line(e)}): give a Hugging Face "
                         f"folder with config.json and weights, or a hub id that is cached or reachable") from e
    return model.to(torch_device)


def weights_disagree(path: Path) -> str | None:
    """Whether the safetensors weights of model folder `path` are the tensors its config.json describes: None when
    they are (or when nothing can be compared), else one line naming the disagreement. transformers loads a
    mismatch anyway (a different architecture: every tensor freshly initialised; a different width: an error deep
    in an actor), so this is checked before Ray starts. The model is built on the meta device: no memory, ~1 s."""
    from safetensors import safe_open
    from transformers import AutoConfig

    stored = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(f, "pt") as handle:
            stored.update({k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()})
    try:
        config = AutoConfig.from_pretrained(path)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception:  # a config this transformers cannot build: from_pretrained will say so itself
        return None
    if not stored:
        return None
    tied = ({n for n, _ in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()})
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in tied}

    def stored_name(key: str) -> str | None:  # exact, or up to a prefix (a base model's weights, a wrapper's)
        if key in stored:
            return key
        hits = [s for s in stored if s.endswith("." + key) or key.endswith("." + s)]
        return hits[0] if len(hits) == 1 else None

    found = {k: stored_name(k) for k in expected}
    for key, name in found.items():
        if name is not None and stored[name] != expected[key]:
            return (f"config.json does not match the weights: {name} is {list(stored[name])} in the weights and "
                    f"{list(expected[key])} by config.json ({config.model_type}): use the config.json saved with "
                    f"these weights")
    missing = [k for k, name in found.items() if name is None]
    if len(missing) > len(expected) / 2:
        return (f"config.json describes a {config.model_type} model ({type(model).__name__}) and {len(missing)} of "
                f"its {len(expected)} tensors are not in the weights (first: {missing[0]}; the weights hold "
                f"{next(iter(sorted(stored)))}, ...): use the config.json saved with these weights")
    return None


def save_model(model: PreTrainedModel, tokenizer, out_dir: Path) -> None:
    """`model` (fp32 safetensors) and its tokenizer (`save_tokenizer`) in `out_dir`; save_pretrained draws a
    progress bar per shard, muted for the duration only."""
    bar_was_enabled = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        model.to(torch.float32).save_pretrained(str(out_dir), safe_serialization=True)
    finally:
        if bar_was_enabled:
            transformers.utils.logging.enable_progress_bar()
    save_tokenizer(tokenizer, out_dir)


def save_tokenizer(tokenizer, out_dir: str | Path) -> None:
    """``tokenizer.save_pretrained(out_dir)``, with a ``tokenizer_class`` that transformers 4 and 5 both resolve.

    transformers 5 records the class as "TokenizersBackend", which transformers 4 (pinned by some inference
    engines) cannot resolve; "PreTrainedTokenizerFast" loads the same tokenizer.json under both.
    """
    tokenizer.save_pretrained(str(out_dir))
    config_path = Path(out_dir) / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text())
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(tokenizer_config, indent=2) + "\n")
