"""The memory plan (opd/memory.py, its terms opd/memory_terms.py): its numbers for a small model against values
worked out by hand, what its terms grow with (tokens per micro-batch, not the batch), and the one-line refusal of
a config that cannot fit on a device given by its memory (no GPU needed). The plan's calibration against measured
CPU peaks is scripts/measure_step_memory.py (docs/LOG.md)."""

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from opd import memory, memory_device, memory_terms
from opd.config import ConfigError
from opd.memory_device import Device
from opd.memory_shapes import model_arch
from opd.overrides import override
from opd.presets import preset, tiny_cpu

GIB = 1 << 30
MIB = 1 << 20
H200 = Device.gpu(141 * GIB, "NVIDIA H200")
# Qwen2-style (q/k/v biases, untied head): student d=64, 2 layers, 4 heads of 16 (2 KV heads), FFN 128, V=1000;
# teacher d=96, 3 layers, 6 heads of 16 (2 KV heads), FFN 192, V=1024 (more output rows, as Qwen2.5-7B has)
STUDENT = dict(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               head_dim=16, intermediate_size=128)
TEACHER = dict(vocab_size=1024, hidden_size=96, num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2,
               head_dim=16, intermediate_size=192)


def _folder(path, shape: dict) -> str:
    """A model folder with only a config.json: the plan reads shapes, never weights."""
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"],
                                                  "tie_word_embeddings": False, **shape}))
    return str(path)


@pytest.fixture
def small(tmp_path):
    """4 prompts x 1 sample of 10 + 6 tokens (16 per sequence, 64 per step), 2 evaluation prompts; micro-batches
    of 32 learner tokens and 48 teacher tokens; teacher in bf16."""
    cfg = tiny_cpu()
    for s in (f"model.student={_folder(tmp_path / 'student', STUDENT)}",
              f"model.teacher={_folder(tmp_path / 'teacher', TEACHER)}", "model.dtype=bfloat16",
              "train.prompts_per_step=4", "rollout.max_new_tokens=6", "data.num_eval_prompts=2",
              "learner.micro_batch_tokens=32", "teacher.micro_batch_tokens=48"):
        cfg = override(cfg, s)
    return cfg


def _with(cfg, *assignments):
    for a in assignments:
        cfg = override(cfg, a)
    return cfg


def test_parameter_counts_are_the_models(small):
    """By hand: student 2 x 64000 (embedding, head) + 2 x (36864 matmul + 128 norms + 128 biases) + 64 = 202304;
    teacher 2 x 98304 + 3 x (79872 + 192 + 160) + 96 = 437376; and what transformers builds."""
    student, teacher = model_arch(small.model.student), model_arch(small.model.teacher)
    assert (student.params, teacher.params) == (202304, 437376)
    for shape, arch in ((STUDENT, student), (TEACHER, teacher)):
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.for_model("qwen2", **shape))
        assert model.num_parameters() == arch.params


def test_plan_numbers_by_hand(small):
    p = memory.plan(small, Device.cpu(64 * GIB), prompt_tokens=10)
    learner, teacher, rollout = (p.actors[r].breakdown() for r in ("learner", "teacher", "rollout"))
    # learner: fp32 weights and gradients (from the first backward to the optimizer step, which frees them), two
    # AdamW moments, the teacher head [1024, 96] in the teacher's dtype (bf16)
    assert learner["weights"] == learner["grads"] == 202304 * 4 and learner["optimizer"] == 2 * 202304 * 4
    assert [t.persistent for t in p.actors["learner"].terms if t.name in ("weights", "grads")] == [True, False]
    assert learner["teacher head"] == 1024 * 96 * 2
    # the teacher's part of one micro-batch at a time: 12 response tokens x d_t in bf16
    assert learner["received teacher states"] == 12 * 96 * 2
    # one micro-batch of 32 tokens (two packed sequences), 12 of them predicting response tokens. Per token:
    # each layer saves 4 x (6 x 64 + 4 x 64 + 4 x 128 + 4 heads) = 4624 bytes, twice; final norm, rotary and ids
    # 2 x 64 x 4 + 2 x 16 x 4 + 8 = 648. Plus the gathered [12, 64] fp32 states.
    assert learner["activations"] == 32 * (2 * 4624 + 648) + 12 * 64 * 4 == 319744
    assert learner["attention mask"] == 32 * 32 * (1 + 4)  # bool + sdpa's fp32 additive copy
    # chunk: at most the 12 response rows. Forward: 6 [12, 1000] fp32 blocks beside the [1000, 64] fp32 weight
    # gradient; backward: that gradient and its scaled copy; the larger, plus per response token d loss / d h_s
    # twice
    blocks = 6 * 12 * 1000 * 4
    assert learner["loss blocks"] == max(blocks + 256000, 2 * 256000) + 12 * 2 * 64 * 4 == 550144
    # fp32 compute: the forward widens the bf16 teacher head's 1000 rows to fp32 beside them
    assert learner["output weight copies"] == blocks + 256000 + 1000 * 96 * 4 - 544000 == 384000
    # two micro-batches: the first one's gradients are there when the second one's activations peak
    assert learner["grads of earlier micro-batches"] == 202304 * 4
    # the layers' backward intermediates (int(1.8 x 128 x 4) = 921 bytes per token) beside one [1000, 64] gradient
    # stay below the loss's peak: they add nothing
    assert learner["backward working set"] == max(0, 256000 + 32 * 921 - 544000) == 0
    # > the optimizer phase's 512000 (the CPU AdamW's temporary) + 809216 (the gradients)
    assert p.actors["learner"].step_bytes == 2304 + 319744 + 5120 + 550144 + 384000 + 809216
    # teacher: bf16 weights; a packed row of 48 tokens: (3 x 192 + 4 x 96) x 2 bytes per token and a bool mask
    assert teacher["weights"] == 437376 * 2
    assert teacher["forward transients"] == 48 * (3 * 192 + 4 * 96) * 2 + 48 * 48 == 94464
    # streamed states: a row's (3 sequences, 18 response tokens) and the part being yielded (12), bf16
    assert teacher["states in flight"] == (18 + 12) * 96 * 2
    # its evaluation phase (greedy answers to 2 prompts of 10 + 6 tokens) is larger than scoring, and they do not
    # add up: KV 2 x 16 x (2 x 3 layers x 2 heads x 16 x 2 bytes) plus one layer's growth copy
    assert teacher["eval KV cache"] == 2 * 16 * 384 + (2 * 16 * 384) // 3 == 16384
    assert teacher["eval prefill"] == 2 * 10 * 1920 + 2 * 100 + 4 * 2 * 1024 * 4 == 71368
    assert teacher["eval scores"] == 3 * 6 * 2 * 1024 * 4  # generate(output_scores=True) on the CPU
    assert p.actors["teacher"].step_bytes == 16384 + 71368 + 147456
    # rollout (cpu mode: fp32, its weights are the learner's buffer): 4 sequences
    assert rollout["generate KV cache"] == 4 * 16 * 512 + 4 * 16 * 512 // 2
    # the machine's RAM holds every actor's persistent terms and the largest phase (they run one after another)
    persistent = sum(p.actors[r].persistent_bytes for r in ("rollout", "teacher", "learner"))
    assert persistent == 3 * memory_terms.CPU_PROCESS_BYTES + 3 * 202304 * 4 + 1024 * 96 * 2 + 437376 * 2
    assert p.uses[0].need_bytes == persistent + 877312 + 384000 + 809216 and p.fits
    # the whole batch in one micro-batch: backward builds the gradients as it frees the activations
    whole = memory.plan(override(small, "learner.micro_batch_tokens=0"), Device.cpu(64 * GIB),
                        prompt_tokens=10).actors["learner"]
    assert "grads of earlier micro-batches" not in whole.breakdown()
    assert whole.step_bytes == max(sum(t.bytes for t in whole.terms if t.phase == "step" and not t.persistent),
                                   512000 + 809216)


def test_activations_follow_the_micro_batch_not_the_batch(small):
    """Per-micro-batch terms scale with learner.micro_batch_tokens (linearly; the packed row's mask with its
    square) and not at all with the batch; the teacher's states too in cpu mode (streamed); the KV cache, and the
    states the GPU transports keep, grow with it."""
    def terms(*assignments):
        p = memory.plan(_with(small, "train.prompts_per_step=64", *assignments), Device.cpu(64 * GIB),
                        prompt_tokens=10)
        return {r: a.breakdown() for r, a in p.actors.items()}

    by_budget = [terms(f"learner.micro_batch_tokens={m}", f"teacher.micro_batch_tokens={m}") for m in (64, 128, 256)]
    act = [t["learner"]["activations"] for t in by_budget]
    assert act[1] == 2 * act[0] and act[2] == 4 * act[0]
    mask = [t["learner"]["attention mask"] for t in by_budget]
    assert mask[1] == 4 * mask[0] and mask[2] == 16 * mask[0]
    forward = [t["teacher"]["forward transients"] - m * m for t, m in zip(by_budget, (64, 128, 256), strict=True)]
    assert forward[1] == 2 * forward[0] and forward[2] == 4 * forward[0]

    by_batch = [terms(f"train.prompts_per_step={b}") for b in (4, 64, 1024)]
    for role, name in (("learner", "activations"), ("learner", "attention mask"), ("learner", "loss blocks"),
                       ("teacher", "forward transients")):
        assert len({t[role][name] for t in by_batch}) == 1, (role, name)
    for role, name in (("learner", "received teacher states"), ("teacher", "states in flight")):
        assert len({t[role][name] for t in by_batch}) == 1, (role, name)  # streamed one micro-batch at a time
    # the GPU transports keep the step's states on the teacher's device: they grow with the batch
    split = [terms(f"train.prompts_per_step={b}", "run.mode=split")["teacher"]["returned states"] for b in (4, 64)]
    assert split == [b * 6 * 96 * 2 for b in (4, 64)]
    # the whole batch at once (budget 0, the old behaviour) grows with the batch
    whole = [terms(f"train.prompts_per_step={b}", "learner.micro_batch_tokens=0")["learner"]["activations"]
             for b in (4, 64)]
    assert whole[1] == 16 * whole[0]


def test_checkpointing_and_bf16_compute_change_the_activations(small):
    cpu = Device.cpu(64 * GIB)
    base = memory.plan(small, cpu, prompt_tokens=10).actors["learner"].breakdown()
    ckpt = memory.plan(_with(small, "learner.gradient_checkpointing=true"), cpu,
                       prompt_tokens=10).actors["learner"].breakdown()
    # checkpointing keeps each layer's fp32 input (2 x 64 x 4 per token) instead of what it saves (2 x 4624) ...
    assert base["activations"] - ckpt["activations"] == 32 * (2 * 4624 - 2 * 64 * 4)
    # ... and recomputes one layer in backward, beside one [V, d] gradient: here still below the loss's peak
    assert ckpt["backward working set"] == max(0, 256000 + 32 * (921 + 4624) - 544000) == 0
    # 512 tokens with one-row chunks: the loss's peak is its forward's (one [1, 1000] block x 6, the [1000, 64]
    # gradient, the widened [1000, 96] teacher head), the recompute exceeds it
    big = memory.plan(_with(small, "learner.gradient_checkpointing=true", "learner.micro_batch_tokens=512",
                            "train.prompts_per_step=64", "loss.chunk_size=1"), cpu,
                      prompt_tokens=10).actors["learner"].breakdown()
    assert big["backward working set"] == 256000 + 512 * (921 + 4624) - (6 * 1000 * 4 + 256000 + 1000 * 96 * 4)
    bf16 = memory.plan(_with(small, "learner.compute_dtype=bfloat16"), H200,
                       prompt_tokens=10).actors["learner"].breakdown()
    # autocast caches bf16 copies of every layer's matmul weights; the loss's forward operands are a bf16 copy of
    # the student's head and the bf16 teacher head as it is, beside its blocks and the [1000, 64] fp32 gradient,
    # which here outweigh the backward's two
    assert bf16["autocast weight copies"] == 2 * 36864 * 2
    assert bf16["output weight copies"] == 1000 * 64 * 2
    assert bf16["loss blocks"] == 6 * 12 * 1000 * 4 + 256000 + 12 * 2 * 64 * 4


def test_anchor_hub_ids_use_the_shape_files_and_others_are_not_planned(monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)  # no cached configs
    for name in ("qwen25_1p5b_from_7b", "qwen3_1p7b_from_8b"):
        cfg = preset(name)
        assert model_arch(cfg.model.student).source.endswith(".json")
        p = memory.check(cfg, H200)  # the presets fit an H200 as they are
        assert p.fits and not p.not_planned and len(p.format().splitlines()) == 1
    p = memory.check(preset("llama32_1b_from_3b"), H200)  # no shape file: no invented numbers, no refusal
    assert p.not_planned.startswith("not planned: no shape") and "meta-llama/Llama-3.2-1B-Instruct" in p.not_planned
    assert p.format().startswith("memory plan: not planned")


def _refusal(cfg, device) -> str:
    with pytest.raises(ConfigError) as info:
        memory.check(cfg, device)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def test_a_config_that_cannot_fit_is_refused_with_the_setting_to_change():
    cfg = preset("qwen25_1p5b_from_7b")  # colocated, 16k learner tokens with checkpointing, 32k teacher tokens
    # the whole batch at once without checkpointing: the learner's activations are the problem
    message = _refusal(_with(cfg, "learner.micro_batch_tokens=0", "learner.gradient_checkpointing=false"), H200)
    assert message.startswith("memory plan: learner does not fit on GPU 0 (NVIDIA H200, 141.0 GiB): estimate ")
    assert "lower learner.micro_batch_tokens (now 0, the whole batch) or turn on learner.gradient_checkpointing" \
        in message
    # the teacher's forward over one 1M-token row
    message = _refusal(_with(cfg, "teacher.micro_batch_tokens=1048576", "train.prompts_per_step=256"), H200)
    assert "teacher does not fit" in message and "lower teacher.micro_batch_tokens (now 1048576)" in message
    # sglang's static reservation
    message = _refusal(_with(cfg, "rollout.engine=sglang", "rollout.mem_fraction=0.9"), H200)
    assert "rollout does not fit" in message and "lower rollout.mem_fraction (now 0.9)" in message
    # a 40 GiB GPU: the three actors' weights and the learner's optimizer state alone are too much
    a100 = Device.gpu(40 * GIB, "NVIDIA A100-SXM4-40GB")
    message = _refusal(cfg, a100)
    assert "weights, gradients and optimizer state alone" in message and "use --mode split" in message
    # split mode: the learner alone on GPU 0, rollout and teacher on GPU 1, each against one GPU's memory
    p = memory.plan(_with(cfg, "run.mode=split"), Device.gpu(80 * GIB, "NVIDIA H100 80GB HBM3", 2))
    assert [(u.name, u.roles) for u in p.uses] == [("GPU 0", ("learner",)), ("GPU 1", ("rollout", "teacher"))]
    assert p.uses[0].need_bytes == p.actors["learner"].peak_bytes and p.fits


def test_the_cpu_only_warns(small):
    p = memory.check(small, Device.cpu(64 * MIB), prompt_tokens=10)  # does not raise
    assert not p.fits and len(p.problems) == 1 and "on RAM (RAM, 0.1 GiB)" in p.problems[0]


def test_preflight_refuses_before_the_run_directory(tmp_path, monkeypatch, capsys):
    """A GPU mode whose plan does not fit the (simulated) GPU stops in preflight with the plan's line and leaves no
    run directory; the default run prints nothing about memory."""
    from opd import preflight as pf

    monkeypatch.setattr(memory, "detect", lambda cfg: Device.gpu(GIB, "a 1 GiB GPU"))
    # ray_address: the GPU count is the cluster's, so the device check lets the mode through to the plan
    cfg = _with(tiny_cpu(), "run.mode=colocated", "run.ray_address=127.0.0.1:1", f"run.out_dir={tmp_path}",
                "data.num_eval_prompts=8")
    with pytest.raises(ConfigError, match="memory plan: .* does not fit on GPU 0 .*use --mode split"):
        pf.preflight(cfg)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(memory, "detect", lambda cfg: Device.gpu(80 * GIB, "an 80 GiB GPU"))
    pf.preflight(override(cfg, "run.name=fits"))
    assert capsys.readouterr().out.startswith("memory plan (colocated): GPU 0 (an 80 GiB GPU, 80.0 GiB) needs ")
    monkeypatch.undo()
    pf.preflight(_with(tiny_cpu(), f"run.out_dir={tmp_path}", "run.name=default"))
    assert "memory" not in capsys.readouterr().out


def test_the_gpu_is_read_from_nvidia_smi(monkeypatch):
    """No CUDA context in the driver: the GPUs' names and memory come from nvidia-smi, as CUDA_VISIBLE_DEVICES
    lists them; the smallest one is planned for."""
    import subprocess

    class Done:
        stdout = "0, NVIDIA H200, 143771\n1, NVIDIA H100 80GB HBM3, 81559\n2, NVIDIA H200, 143771\n"

    monkeypatch.setattr(subprocess, "run", lambda *a, **k: Done())
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,2")
    device = memory_device.detect(preset("qwen25_1p5b_from_7b"))
    assert device == Device("cuda", "NVIDIA H200", 143771 << 20, 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert memory_device.detect(preset("qwen25_1p5b_from_7b")).name == "NVIDIA H100 80GB HBM3"
    assert memory_device.detect(tiny_cpu()).kind == "cpu"


def test_a_kv_budget_bounds_the_rollout_and_the_evaluation(small):
    """rollout.max_batch_tokens: the engines decode in waves, so their KV cache, prefill and scores follow one
    wave's rows, not the batch's or the held-out set's."""
    def terms(*assignments):
        p = memory.plan(_with(small, "train.prompts_per_step=64", "data.num_eval_prompts=40", *assignments),
                        Device.cpu(64 * GIB), prompt_tokens=10)
        return p.actors["rollout"].breakdown(), p.actors["teacher"].breakdown()

    (rollout, teacher), (rollout_b, teacher_b) = terms(), terms("rollout.max_batch_tokens=64")
    # 64 sequences of 10 + 6 tokens, then waves of 64 // 16 = 4 rows; the teacher's 40 held-out answers likewise
    assert rollout_b["generate KV cache"] * 16 == rollout["generate KV cache"]
    assert teacher_b["eval KV cache"] * 10 == teacher["eval KV cache"]
    assert teacher_b["eval scores"] * 10 == teacher["eval scores"]
