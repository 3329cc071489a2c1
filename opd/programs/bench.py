"""Benchmark mode (`python driver.py --bench`): timed OPD steps, per phase, against a roofline.

    python driver.py --bench                                          # tiny_cpu's toy models, on the CPU
    python driver.py --bench --set bench.shapes=qwen3_1p7b_8b --set bench.num_layers=1 \\
        --set bench.vocab_size=32768 --set rollout.max_new_tokens=128 --set train.prompts_per_step=4
    python driver.py --preset qwen25_1p5b_from_7b --mode split --bench --set bench.shapes=qwen25_1p5b_7b

A benchmark step is a training step: the training loop's `Step` (rollout -> teacher -> learner -> sync, restarts
and run.overlap as in training, opd/programs/step.py), on random prompts of `bench.prompt_tokens` ids and fixed-length responses
(`rollout.ignore_eos`: every response has `rollout.max_new_tokens` tokens, so every step does the same work).
`bench.warmup_steps` untimed steps come first; then, over `bench.steps` timed steps, each phase's wall time,
response tokens per second, each actor's peak memory, and the phase's roofline (opd/roofline.py): its FLOPs and
bytes against the device's peaks, and the fraction of that bound the phase reached. `bench.shapes` benchmarks
the anchors' model shapes with random weights (opd/shapes.py): nothing is downloaded.

The run directory holds `bench.json` (schema: docs/bench_schema.json) and the resolved `config.json`.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from opd import roofline
from opd.config import PROJECT_ROOT, Config, ConfigError
from opd.shapes import SHAPE_PAIRS

SCHEMA_PATH = PROJECT_ROOT / "docs" / "bench_schema.json"
SCHEMA_ID = "opd-bench/2"
# the training step's phases (opd/programs/step.py PhaseClock), and those the roofline bounds: `train` is the
# learner's forward-backward and optimizer step, each timed on its own clock
STEP_PHASES = ("rollout", "teacher", "train", "overlap_wait", "sync")
PHASES = ("rollout", "teacher", "learner_forward_backward", "optimizer", "sync")
ROLES = ("rollout", "teacher", "learner")


# ---------------------------------------------------------------- before Ray


def prepare(cfg: Config) -> tuple[Config, Path, int]:
    """The bench's refusals and set-up before Ray starts: fixed-length responses, the shapes' model folders,
    the run directory. Returns the resolved config, the run directory and the valid vocabulary size."""
    from opd.modes import check_devices
    from opd.metrics import write_json_atomic
    from opd.preflight import make_run_dir
    from opd.shapes import build_pair

    b = cfg.bench
    if b.shapes and b.shapes not in SHAPE_PAIRS:
        raise ConfigError(f"bench.shapes={b.shapes!r} is unknown: use one of {', '.join(SHAPE_PAIRS)}, or leave it "
                          f"empty to benchmark model.student / model.teacher")
    if not b.shapes and (b.num_layers or b.vocab_size):
        raise ConfigError("bench.num_layers and bench.vocab_size change a shape: set bench.shapes too (one of "
                          f"{', '.join(SHAPE_PAIRS)})")
    if cfg.rollout.student_fraction < 1 or cfg.data.gold_prefix_field:
        raise ConfigError("--bench times on-policy steps on random prompts: leave rollout.student_fraction at 1 and "
                          "data.gold_prefix_field empty")
    check_devices(cfg)
    cfg = dataclasses.replace(
        cfg, rollout=dataclasses.replace(cfg.rollout, ignore_eos=True),
        train=dataclasses.replace(cfg.train, steps=b.warmup_steps + b.steps, eval_every=0))
    run_dir = make_run_dir(cfg)
    if b.shapes:
        student, teacher = build_pair(b.shapes, run_dir / "models", num_layers=b.num_layers, vocab_size=b.vocab_size)
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, student=str(student), teacher=str(teacher)))
    valid_vocab = _check_models(cfg)
    write_json_atomic(run_dir / "config.json", cfg.to_dict())  # resolved: with the bench's model folders
    return cfg, run_dir, valid_vocab


def _check_models(cfg: Config) -> int:
    from transformers import AutoConfig

    from opd.compatibility import check_compatible
    from opd.models import ModelError, load_tokenizer, model_source, quiet_transformers

    quiet_transformers()
    sources = [model_source(cfg.model.student), model_source(cfg.model.teacher)]
    try:
        tokenizers = [load_tokenizer(s) for s in sources]
        configs = [AutoConfig.from_pretrained(s) for s in sources]
        return check_compatible(*tokenizers, *configs)
    except (ModelError, OSError) as e:
        raise ConfigError(str(e).splitlines()[0]) from None


# ---------------------------------------------------------------- the timed steps


def run_bench(cfg: Config) -> dict:
    """Benchmark `cfg` (see the module docstring); prints the table, returns the JSON record."""
    cfg, run_dir, valid_vocab = prepare(cfg)  # every refusal happens here, before Ray starts
    from opd.cluster import topology
    from opd.metrics import write_json_atomic

    with topology.running(cfg) as actors:
        t0 = time.perf_counter()
        actors.teacher_head_to_learners()
        actors.sync_weights()
        startup_s = actors.launch_s + time.perf_counter() - t0  # launch, the teacher's head, the first sync
        steps, memory = _steps(cfg, actors, valid_vocab, run_dir)
    record = _record(cfg, steps, memory, startup_s)
    write_json_atomic(run_dir / "bench.json", record)
    print(format_table(record))
    print(f"\nrun directory: {run_dir} (bench.json)")
    return record


def _roles(actors) -> dict[str, list]:
    return {"rollout": list(actors.rollouts), "teacher": list(actors.teachers), "learner": list(actors.learners)}


def _memory(actors, method: str) -> dict[str, list[dict]]:
    import ray

    roles = _roles(actors)
    refs = {role: [getattr(h, method).remote() for h in handles] for role, handles in roles.items()}
    return {role: ray.get(r) for role, r in refs.items()}


class RandomPrompts:
    """The benchmark's prompt stream: `bench.prompt_tokens` random ids per prompt, above the synthetic tokenizers'
    specials (pad 0, eos 1, unk 2), drawn in step order from train.seed."""

    def __init__(self, cfg: Config, valid_vocab: int):
        import torch

        self.generator, self.length, self.vocab = torch.Generator().manual_seed(cfg.train.seed), \
            cfg.bench.prompt_tokens, valid_vocab

    def next_batch(self, n: int) -> list:
        import torch

        from opd.prompts import Prompt

        ids = torch.randint(3, self.vocab, (n, self.length), generator=self.generator).tolist()
        return [Prompt(student_ids=tuple(p), teacher_ids=None, answer=None, text="") for p in ids]


def _steps(cfg: Config, actors, valid_vocab: int, run_dir: Path) -> tuple[list[dict], dict]:
    """Warm-up, then the timed steps: each the training loop's `Step` (its phases, restarts and run.overlap),
    with per step the phases' wall times (driver side; the learner's split of `train` from its own clock) and the
    step's metrics. Peak memory is reset after the warm-up and read at the end."""
    from opd.programs.rollouts import Rollouts
    from opd.programs.step import Step

    b = cfg.bench
    step_once = Step(cfg, actors, Rollouts(cfg, actors, RandomPrompts(cfg, valid_vocab)), say=print, run_dir=run_dir)
    expected_tokens = cfg.train.prompts_per_step * cfg.rollout.num_samples * cfg.rollout.max_new_tokens
    rows, baseline = [], None
    for step in range(1, b.warmup_steps + b.steps + 1):
        if step == b.warmup_steps + 1:
            _memory(actors, "reset_peak_memory")
            baseline = _memory(actors, "memory_stats")  # resident memory when the timed steps start
        metrics = step_once(step)
        if metrics["response/tokens/sum"] != expected_tokens:
            raise RuntimeError(f"{metrics['response/tokens/sum']:.0f} response tokens, expected {expected_tokens}: "
                               f"the engine did not honour rollout.ignore_eos")
        print(f"bench step {step}/{b.warmup_steps + b.steps}{' (warm-up)' if step <= b.warmup_steps else ''}: "
              f"{metrics['timing/step_s']:.2f} s", flush=True)
        if step > b.warmup_steps:
            rows.append({"step": step, **{p: metrics[f"timing/{p}_s"] for p in STEP_PHASES},
                         "learner_forward_backward": metrics["timing/learner_forward_backward_s"],
                         "optimizer": metrics["timing/optimizer_s"], "total": metrics["timing/step_s"],
                         "response_tokens": int(metrics["response/tokens/sum"]), "loss": metrics["loss"],
                         "policy_lag": int(metrics["sync/policy_lag"])})
    peaks = _memory(actors, "memory_stats")
    memory = {role: [{"device": p["device"], "peak_rss_bytes": p["peak_rss_bytes"],
                      "rss_at_start_bytes": s["rss_bytes"], "peak_cuda_bytes": p["peak_cuda_bytes"]}
                     for p, s in zip(peaks[role], baseline[role], strict=True)] for role in ROLES}
    return rows, memory


# ---------------------------------------------------------------- the record


def _shape(name: str) -> roofline.DecoderShape:
    from transformers import AutoConfig

    from opd.models import model_source

    config = AutoConfig.from_pretrained(model_source(name))
    return roofline.DecoderShape.of(config.get_text_config() if hasattr(config, "get_text_config") else config)


def device_peak(cfg: Config, device: str) -> roofline.DevicePeak | None:
    """The roofline's peaks: the datasheet table for a known GPU, measured for the CPU (with the actors' thread
    count), replaced by bench.peak_tflops / bench.peak_gbps when given; None for an unknown GPU without them."""
    b = cfg.bench
    peak = roofline.measure_cpu(cfg.run.threads_per_actor) if device == "cpu" else roofline.lookup_gpu(device)
    if peak is None:
        if not (b.peak_tflops and b.peak_gbps):
            return None
        peak = roofline.DevicePeak(device, {"float32": 0.0}, 0.0, 0.0, "setting")
    return roofline.with_settings(peak, b.peak_tflops, b.peak_gbps)


def _dtype_bytes(dtype: str) -> int:
    return 4 if dtype == "float32" else 2


def _costs(cfg: Config, student: roofline.DecoderShape, teacher: roofline.DecoderShape) -> dict[str, roofline.Cost]:
    w = roofline.Workload(cfg.train.prompts_per_step * cfg.rollout.num_samples, cfg.bench.prompt_tokens,
                          cfg.rollout.max_new_tokens)
    # cpu mode: the engine serves the learner's fp32 weights; the GPU modes the model.dtype copy
    serving = "float32" if cfg.run.mode == "cpu" else cfg.model.dtype
    r = cfg.rollout
    canary = cfg.loss.kind != "sampled_rkl" and r.top_p == 1.0 and r.top_k == 0
    return {"rollout": roofline.rollout_cost(student, w, _dtype_bytes(serving), serving),
            "sync": roofline.sync_cost(student, cfg.run.mode, _dtype_bytes(serving)),
            "teacher": roofline.teacher_cost(teacher, w, _dtype_bytes(cfg.model.dtype), cfg.model.dtype),
            "learner_forward_backward": roofline.learner_cost(student, teacher, w, canary=canary),
            "optimizer": roofline.optimizer_cost(student)}


def _stats(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values), "values": values}


def _versions() -> dict:
    versions = {"python": platform.python_version()}
    for dist in ("torch", "transformers", "ray", "sglang", "triton"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    try:
        versions["opd_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=PROJECT_ROOT, text=True,
                                                capture_output=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        versions["opd_commit"] = None
    return versions


def _cache_line(reads: list[dict]) -> str:
    """`; cache reads 29.3 GB/s to 48 MiB`: the best read rate among the probed sizes, and the largest size that
    still reaches 90 % of it."""
    if not reads:
        return ""
    top = max(r["bytes_per_s"] for r in reads)
    held = max(r["bytes"] for r in reads if r["bytes_per_s"] >= 0.9 * top)
    return f"; cache reads {top / 1e9:.1f} GB/s to {held >> 20} MiB"


def _record(cfg: Config, rows: list[dict], memory: dict, startup_s: float) -> dict:
    student, teacher = _shape(cfg.model.student), _shape(cfg.model.teacher)
    device = memory["learner"][0]["device"]
    peak = device_peak(cfg, device)
    costs = _costs(cfg, student, teacher)
    tokens = rows[0]["response_tokens"]
    phases = {}
    for name in PHASES:
        times = _stats([r[name] for r in rows])
        entry = {"time_s": times, "tokens_per_s": tokens / times["mean"] if times["mean"] > 0 else None}
        if peak is None:
            entry["roofline"] = None
        else:
            roof = roofline.bound(costs[name], peak)
            # no bound (nothing to move, e.g. the cpu mode's shared weights): no fraction either
            roof["fraction_of_bound"] = roof["bound_s"] / times["mean"] if times["mean"] > 0 < roof["bound_s"] else None
            entry["roofline"] = roof
        phases[name] = entry
    total = _stats([r["total"] for r in rows])
    other = _stats([r["total"] - sum(r[p] for p in PHASES) for r in rows])
    return {
        "schema": SCHEMA_ID,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "mode": cfg.run.mode,
        "device": {"name": device, "peak": None if peak is None else {
            "name": peak.name, "source": peak.source, "flops_per_s": peak.flops,
            "memory_bytes_per_s": peak.memory_bytes_per_s, "link_bytes_per_s": peak.link_bytes_per_s,
            "cache_reads": [{"bytes": size, "bytes_per_s": rate} for size, rate in peak.cache_reads]}},
        "versions": _versions(),
        "models": {"shapes": cfg.bench.shapes or None, "random_weights": bool(cfg.bench.shapes),
                   "dtype": cfg.model.dtype, "student": {"source": cfg.model.student, **roofline.shape_dict(student)},
                   "teacher": {"source": cfg.model.teacher, **roofline.shape_dict(teacher)}},
        "workload": {"prompts_per_step": cfg.train.prompts_per_step, "samples_per_prompt": cfg.rollout.num_samples,
                     "prompt_tokens": cfg.bench.prompt_tokens, "response_tokens": cfg.rollout.max_new_tokens,
                     "response_tokens_per_step": tokens, "loss": cfg.loss.kind, "warmup_steps": cfg.bench.warmup_steps,
                     "timed_steps": cfg.bench.steps, "threads_per_actor": cfg.run.threads_per_actor},
        "startup_s": startup_s,
        "phases": phases,
        "step": {"time_s": total, "tokens_per_s": tokens / total["mean"], "other_s": other,
                 "train_s": _stats([r["train"] for r in rows]),
                 "overlap_wait_s": _stats([r["overlap_wait"] for r in rows])},
        "memory": memory,
        "steps": rows,
    }


def format_table(record: dict) -> str:
    """The console table: one row per phase, then the step and the actors' peak memory."""
    gib = 1 << 30
    w = record["workload"]
    lines = [(f"benchmark: mode {record['mode']}, device {record['device']['name']}, {w['prompts_per_step']} prompts "
              f"x {w['samples_per_prompt']} x {w['response_tokens']} tokens, {w['timed_steps']} timed steps"),
             (f"{'phase':<26}{'time s':>9}{'tokens/s':>11}{'GFLOP':>10}{'GB':>9}{'bound s':>10}{'by':>9}"
              f"{'of bound':>10}")]
    for name, p in record["phases"].items():
        roof = p["roofline"] or {}
        fraction = roof.get("fraction_of_bound")
        lines.append(f"{name:<26}{p['time_s']['mean']:>9.3f}{_num(p['tokens_per_s'], '.0f'):>11}"
                     f"{_num(roof.get('flops'), '.1f', 1e-9):>10}{_num(roof.get('bytes'), '.2f', 1e-9):>9}"
                     f"{_num(roof.get('bound_s'), '.4f'):>10}{roof.get('bound_by', '-'):>9}"
                     f"{_num(fraction, '.1%'):>10}")
    step = record["step"]
    lines.append(f"{'step (wall)':<26}{step['time_s']['mean']:>9.3f}{step['tokens_per_s']:>11.0f}"
                 f"   (Ray and transfers: {step['other_s']['mean']:.3f} s)")
    peaks = []
    for role, entries in record["memory"].items():
        for e in entries:
            cuda = f", CUDA {e['peak_cuda_bytes'] / gib:.2f} GiB" if e["peak_cuda_bytes"] is not None else ""
            peaks.append(f"{role} RSS {e['peak_rss_bytes'] / gib:.2f} GiB "
                         f"(+{(e['peak_rss_bytes'] - e['rss_at_start_bytes']) / gib:.2f} during steps){cuda}")
    lines.append("peak memory: " + "; ".join(peaks))
    peak = record["device"]["peak"]
    lines.append("roofline peaks: " + ("none known for this device: set bench.peak_tflops and bench.peak_gbps"
                                       if peak is None else
                                       f"{peak['name']} ({peak['source']}): "
                                       f"{peak['flops_per_s'].get('float32', 0) / 1e12:.2f} TFLOP/s fp32, "
                                       f"{peak['flops_per_s'].get('bfloat16', 0) / 1e12:.2f} bf16, "
                                       f"{peak['memory_bytes_per_s'] / 1e9:.1f} GB/s"
                                       + _cache_line(peak.get("cache_reads") or [])))
    return "\n".join(lines)


def _num(value, spec: str, scale: float = 1.0) -> str:
    return "-" if value is None else format(value * scale, spec)


def load_schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text())
