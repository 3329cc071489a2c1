"""Benchmark mode: a tiny CPU bench end to end (its bench.json checked against docs/bench_schema.json), the
refusals before Ray, fixed-length generation, and the random-weight shape folders."""

import json

import jsonschema
import pytest
import torch
from transformers import AutoTokenizer

from opd.programs import train
from opd.actors.common import load
from opd.actors.engines.hf import HFEngine
from opd import roofline, shapes
from opd.programs.bench import load_schema
from opd.presets import preset


def _flops_counted(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _square_minus_causal(shape: roofline.DecoderShape, batch: int, seq_len: int) -> int:
    """Eager attention computes every score of the square; the roofline counts the causal half it needs."""
    return 4 * shape.layers * shape.heads * shape.head_dim * batch * (seq_len ** 2 - seq_len * (seq_len + 1) // 2)


@pytest.mark.slow
def test_cpu_bench_writes_json_that_matches_the_schema(root, tmp_path, monkeypatch, capsys):
    from opd.programs import bench

    real_memory = bench._memory

    def memory(actors, method):  # mark, in the console's order, when the actors' peak memory is reset and read
        print(f"memory: {method}", flush=True)
        return real_memory(actors, method)

    monkeypatch.setattr(bench, "_memory", memory)
    prompts, response_tokens = 4, 12
    rc = train.main(["--bench", "--set", f"run.out_dir={tmp_path}", "--set", "run.name=b", "--set", "run.progress=false",
                      "--set", f"train.prompts_per_step={prompts}", "--set", f"rollout.max_new_tokens={response_tokens}",
                      "--set", "rollout.num_samples=2", "--set", "bench.steps=2", "--set", "bench.prompt_tokens=5"])
    assert rc == 0
    record = json.loads((tmp_path / "b" / "bench.json").read_text())
    schema = load_schema()
    jsonschema.validate(record, schema)  # raises on any missing or mistyped field
    # the schema can fail: a record without a phase, or with a wrong type, is refused
    broken = json.loads(json.dumps(record))
    del broken["phases"]["optimizer"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)
    broken = json.loads(json.dumps(record))
    broken["memory"]["learner"][0]["peak_rss_bytes"] = "1 GiB"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)

    # fixed-length responses: every step generated prompts x samples x max_new_tokens tokens
    assert record["workload"]["response_tokens_per_step"] == prompts * 2 * response_tokens
    assert [s["response_tokens"] for s in record["steps"]] == [prompts * 2 * response_tokens] * 2
    assert [s["step"] for s in record["steps"]] == [2, 3]  # one warm-up step, then the two timed ones
    for name, phase in record["phases"].items():
        values = [s[name] for s in record["steps"]]
        assert phase["time_s"]["values"] == values and phase["time_s"]["mean"] == pytest.approx(sum(values) / 2)
    for s in record["steps"]:  # the learner's own split fits inside its wall time on the driver's clock
        assert s["learner_forward_backward"] + s["optimizer"] <= s["train"]
        assert s["rollout"] + s["teacher"] + s["train"] + s["overlap_wait"] + s["sync"] == pytest.approx(s["total"])
        assert s["policy_lag"] == 0  # on-policy: run.overlap is off
    # the roofline's FLOPs against torch's FlopCounterMode running the bench's own models on its workload:
    # generation (prompts x samples rows, 5 prompt tokens, 12 new ones) and the teacher's forward
    from transformers import AutoModelForCausalLM

    rows, prompt_len = prompts * 2, 5
    ids = torch.randint(3, 16, (rows, prompt_len), generator=torch.Generator().manual_seed(0))
    models = {side: AutoModelForCausalLM.from_pretrained(root / "assets/toy" / side, attn_implementation="eager").eval()
              for side in ("student", "teacher")}
    shapes_ = {side: roofline.DecoderShape.of(m.config) for side, m in models.items()}
    with torch.no_grad():
        counted = _flops_counted(lambda: models["student"].generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, max_new_tokens=response_tokens,
            min_new_tokens=response_tokens, pad_token_id=0, eos_token_id=15))
        full = torch.randint(3, 16, (rows, prompt_len + response_tokens))
        counted_teacher = _flops_counted(lambda: models["teacher"].get_decoder()(input_ids=full))
    assert record["phases"]["rollout"]["roofline"]["flops"] == pytest.approx(
        counted - _square_minus_causal(shapes_["student"], rows, prompt_len), rel=1e-9)
    assert record["phases"]["teacher"]["roofline"]["flops"] == pytest.approx(
        counted_teacher - _square_minus_causal(shapes_["teacher"], rows, prompt_len + response_tokens), rel=1e-9)
    assert record["phases"]["sync"]["roofline"]["bytes"] == 0  # cpu mode: the engine maps the learner's buffer
    assert record["device"]["name"] == "cpu" and record["device"]["peak"]["source"] == "measured"
    # the distribution's version (the wheel's metadata names no local build: 2.14.1 for torch 2.14.1+cu130)
    assert record["versions"]["torch"] == torch.__version__.split("+")[0]
    for entries in record["memory"].values():
        assert entries[0]["peak_rss_bytes"] >= entries[0]["rss_at_start_bytes"] > 0
    # peak memory covers the timed steps only: reset after the warm-up step, read after the last step
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("bench step", "memory:"))]
    assert [line.split(":")[0] if line.startswith("bench") else line for line in lines] == [
        "bench step 1/3 (warm-up)", "memory: reset_peak_memory", "memory: memory_stats", "bench step 2/3",
        "bench step 3/3", "memory: memory_stats"]
    assert (tmp_path / "b" / "config.json").is_file()


@pytest.mark.slow
def test_the_bench_times_the_training_step_with_overlap(tmp_path):
    """The benchmark calls the training loop's Step: with run.overlap=true each step after the first is sampled
    while the previous one trained (one version behind), and the wait for it is its own phase."""
    rc = train.main(["--bench", "--set", f"run.out_dir={tmp_path}", "--set", "run.name=o", "--set", "run.progress=false",
                     "--mode", "split", "--set", "run.device=cpu", "--set", "run.overlap=true",
                     "--set", "train.prompts_per_step=2", "--set", "rollout.max_new_tokens=6",
                     "--set", "bench.steps=2", "--set", "bench.prompt_tokens=4"])
    assert rc == 0
    record = json.loads((tmp_path / "o" / "bench.json").read_text())
    jsonschema.validate(record, load_schema())
    assert [s["policy_lag"] for s in record["steps"]] == [1, 1]
    assert record["step"]["overlap_wait_s"]["values"] == [s["overlap_wait"] for s in record["steps"]]


@pytest.mark.parametrize("args, message", [
    (["--set", "bench.shapes=llama_70b"], "bench.shapes='llama_70b' is unknown"),
    (["--set", "bench.num_layers=2"], "set bench.shapes too"),
    (["--set", "bench.steps=0"], "bench.steps=0 must be > 0"),
])
def test_bench_refusals_happen_before_ray(tmp_path, capsys, args, message):
    rc = train.main(["--bench", "--set", f"run.out_dir={tmp_path}", *args])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())  # nothing was created


def test_shape_folders_build_random_models(tmp_path):
    student_dir, teacher_dir = shapes.build_pair("qwen25_1p5b_7b", tmp_path, num_layers=1, vocab_size=1024)
    for folder, name in ((student_dir, "qwen2.5-1.5b-instruct"), (teacher_dir, "qwen2.5-7b-instruct")):
        config = json.loads((folder / "config.json").read_text())
        published = shapes.shape_config(name)
        assert config["num_hidden_layers"] == 1 and config["vocab_size"] == 1024
        for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                    "tie_word_embeddings", "rope_theta"):
            assert config[key] == published[key]
        assert shapes.is_random(folder) and not list(folder.glob("*.safetensors"))
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        assert len(tokenizer) == 1024 and (tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, 1)
        assert tokenizer.convert_tokens_to_ids(["t5", "t1000"]) == [5, 1000]  # the bench sends ids, never text
    # the actors' loader builds the student from its config, seeded: two loads are the same model
    cfg = preset("tiny_cpu")
    cfg = type(cfg)(**{**cfg.__dict__, "model": type(cfg.model)(student=str(student_dir), teacher=str(teacher_dir))})
    a, b = load(cfg, "student", dtype="float32"), load(cfg, "student", dtype="float32")
    assert type(a).__name__ == "Qwen2ForCausalLM" and a.config.num_hidden_layers == 1
    assert sum(p.numel() for p in a.parameters() if p.dim() == 2) == roofline.DecoderShape.of(a.config).params
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert a.model.embed_tokens.weight.std() > 0.01  # initialised, not zeros


@pytest.mark.parametrize("sampler", [None, "torch"])
def test_ignore_eos_gives_fixed_length_responses(root, sampler):
    tok = AutoTokenizer.from_pretrained(root / "assets/toy/student")
    engine = HFEngine.from_pretrained(str(root / "assets/toy/student"), eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    engine.sampler = sampler  # None: transformers' generate; "torch": the GPU decode loop, run on the CPU
    prompts = [tok(p).input_ids for p in ["07+45=", "99+99=", "1+2="]]
    free = engine.generate(prompts, num_samples=4, max_new_tokens=12, seed=0)
    assert "stop" in free.finish_reasons  # the toy student answers in 4 tokens and stops
    fixed = engine.generate(prompts, num_samples=4, max_new_tokens=12, seed=0, ignore_eos=True)
    assert fixed.response_lens.tolist() == [12] * 12 and set(fixed.finish_reasons) == {"length"}
    assert tok.eos_token_id not in fixed.response_ids.tolist()
    # log-probs are those of the distribution sampled from: end-of-sequence masked out
    for prompt, response, lp in zip(fixed.prompts(), fixed.responses(),
                                    torch.split(fixed.logprobs, fixed.response_lens.tolist()), strict=True):
        logits = engine.model(input_ids=torch.tensor([prompt + response])).logits[0, len(prompt) - 1: -1].float()
        logits[:, tok.eos_token_id] = float("-inf")
        want = torch.log_softmax(logits, -1).gather(1, torch.tensor(response)[:, None]).squeeze(1)
        assert torch.allclose(lp, want, atol=1e-4)


def test_h20_cluster_yaml_is_a_valid_ray_cluster_config(root):
    """opd/cluster/h20x2.yaml passes Ray's own cluster-config schema and starts Ray with both GPUs."""
    import yaml
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((root / "opd" / "cluster" / "h20x2.yaml").read_text())
    validate_config(prepare_config(config))  # raises on an unknown or mistyped field
    assert config["provider"]["type"] == "local" and config["max_workers"] == 0
    assert any("--head" in c and "--num-gpus=2" in c for c in config["head_start_ray_commands"])


def test_reset_peak_memory_starts_a_new_peak():
    """The actors' peak-memory methods (opd/actors/common.py), in this process: a 256 MiB block touched and freed
    raises the peak; after a reset the peak is back near the current resident memory."""
    from opd.actors.common import memory_stats, reset_peak_memory

    block = 256 * 2**20
    reset_peak_memory(None)
    start = memory_stats(None)
    x = torch.ones(block // 4)  # every page written: resident
    del x
    high = memory_stats(None)
    assert high["peak_rss_bytes"] >= start["rss_bytes"] + 0.9 * block
    reset_peak_memory(None)
    after = memory_stats(None)
    assert after["peak_rss_bytes"] < high["peak_rss_bytes"] - 0.5 * block
    assert after["peak_rss_bytes"] >= after["rss_bytes"] > 0
