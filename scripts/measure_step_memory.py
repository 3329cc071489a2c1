"""Peak resident memory of one teacher scoring and one learner step on CPU, against the memory plan (opd/memory.py).

    python scripts/measure_step_memory.py --batches 16,32 --budgets 2048,0 --out runs/step_memory.jsonl
    python scripts/measure_step_memory.py --batches 128 --budgets 2048 --which learner --out runs/step_memory.jsonl
    python scripts/measure_step_memory.py --table runs/step_memory.jsonl      # the table of what was measured

Models: the Qwen2.5-1.5B student / 7B teacher widths cut to 2 layers with their full output rows (151936 /
152064; opd/shapes.py `build_pair("qwen25_1p5b_7b", ..., num_layers=2)`, random weights), or `--models tiny` for
the toy pair of tiny_cpu. Batches: B sequences of `--prompt` random prompt ids and `--response` random response
ids (below the tokenizer's size). The config is tiny_cpu's with the models, `learner.micro_batch_tokens` and
`teacher.micro_batch_tokens` = the budget (0: the whole batch in one row, the old behaviour), model.dtype
(`--dtype`, bfloat16 by default as in the GPU presets: the teacher's weights and the states it sends; the learner
keeps fp32 master weights and computes in `--compute`).

Each measurement runs in a fresh process (no Ray: the actor classes are plain classes): construct the real
TeacherActor or LearnerActor, run one warm-up call on a small batch (`--warmup` sequences: lazily created state
such as AdamW's moments and the gradients exists afterwards), then for the learner drop the gradients (the step
drops them first anyway, so the baseline holds weights and optimizer state only), build the measured batch, hand
freed heap back to the system (malloc_trim), reset the peak resident set (/proc/self/clear_refs) and run (a)
`teacher.score(batch)` to its end, dropping each yielded part (under Ray the object store takes it when it is
yielded), or (b) `learner.train_step(batch, parts)` with random teacher parts made when the learner asks for
each (under Ray it pulls each from the object store when it reaches that micro-batch). Reported:
the peak resident set during the call (absolute) and its growth over the resident set just before it. glibc's
mmap threshold is fixed at 1 MiB so every large tensor is its own mapping, returned when freed (as in
tests/test_kernel_memory.py). Measurements run one after another, never two at once (the machine is small).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
MIB = 1 << 20
SHORT = {"float32": "fp32", "bfloat16": "bf16"}


# ---------------------------------------------------------------- in the child process


def _status() -> dict[str, int]:
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
    return {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM")}


def _reset_peak() -> int:
    malloc_trim = getattr(ctypes.CDLL(None), "malloc_trim", None)  # glibc
    if malloc_trim is not None:
        malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # Linux: VmHWM := VmRSS
    return _status()["VmRSS"]


def make_config(args):
    from opd.overrides import override
    from opd.presets import tiny_cpu

    cfg = tiny_cpu()
    sets = [f"train.prompts_per_step={args.batch}", f"rollout.max_new_tokens={args.response}",
            f"learner.micro_batch_tokens={args.budget}", f"teacher.micro_batch_tokens={args.budget}",
            f"run.threads_per_actor={args.threads}", f"data.max_prompt_tokens={args.prompt}",
            f"learner.gradient_checkpointing={args.checkpointing}"]
    if args.compute != "float32":
        sets.append(f"learner.compute_dtype={args.compute}")
    if args.student:
        sets += [f"model.student={args.student}", f"model.teacher={args.teacher}", f"model.dtype={args.dtype}"]
    for s in sets:
        cfg = override(cfg, s)
    return cfg


def synthetic_batch(num_seqs: int, prompt: int, response: int, vocab: int, version: int, seed: int, budget: int):
    import torch

    from opd.batch import RolloutBatch

    g = torch.Generator().manual_seed(seed)
    n = num_seqs * response
    return RolloutBatch(
        prompt_ids=torch.randint(3, vocab, (num_seqs * prompt,), generator=g),
        prompt_lens=torch.full((num_seqs,), prompt, dtype=torch.int64),
        response_ids=torch.randint(3, vocab, (n,), generator=g),
        response_lens=torch.full((num_seqs,), response, dtype=torch.int64),
        logprobs=-torch.rand(n, generator=g) * 5, prompt_index=torch.arange(num_seqs),
        finish_reasons=["length"] * num_seqs, policy_version=version).check().planned(budget)


class SyntheticParts:
    """The teacher's parts of each micro-batch of the learner's plan, made when the learner asks for one (as a
    Ray learner pulls each part from the object store when it reaches that micro-batch): random states."""

    def __init__(self, batch, budget: int, hidden: int, dtype, seed: int):
        self.batch, self.plan, self.hidden, self.dtype, self.seed = batch, batch.plan(budget), hidden, dtype, seed

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, k: int):
        import torch

        from opd.batch import TeacherScores

        index = self.batch.token_index(self.plan[k])
        g = torch.Generator().manual_seed(self.seed * 100_003 + k)
        states = (torch.randn(index.numel(), self.hidden, generator=g) * 0.5).to(self.dtype)
        return TeacherScores(self.batch.policy_version, k, index, hidden_states=states).check(self.batch)


def child(args) -> dict:
    import torch
    from transformers import AutoConfig

    from opd.models import model_source

    start_rss = _status()["VmRSS"]  # python + torch + transformers + the project, imported
    cfg = make_config(args)
    out = {"which": args.which, "batch": args.batch, "budget": args.budget, "prompt": args.prompt,
           "response": args.response, "models": args.models, "dtype": cfg.model.dtype, "compute": args.compute,
           "checkpointing": args.checkpointing, "threads": args.threads, "warmup_seqs": args.warmup,
           "import_rss_bytes": start_rss}
    t0 = time.perf_counter()
    if args.which == "teacher":
        from opd.actors.teacher import TeacherActor

        actor = TeacherActor(cfg)
        vocab = actor.vocab_size
        out["construct_s"] = time.perf_counter() - t0
        out["constructed_rss_bytes"] = _status()["VmRSS"]
        t0 = time.perf_counter()
        warm = synthetic_batch(args.warmup, args.prompt, args.response, vocab, 0, seed=1, budget=args.budget)
        for _ in actor.score(warm):
            pass
        out["warmup_s"] = time.perf_counter() - t0
        batch = synthetic_batch(args.batch, args.prompt, args.response, vocab, 0, seed=2, budget=args.budget)
        baseline = _reset_peak()
        t0 = time.perf_counter()
        payload = parts = 0
        for part in actor.score(batch):  # under Ray each part goes to the object store when yielded
            payload += part.hidden_states.numel() * part.hidden_states.element_size()
            parts += 1
        del part
        out["step_s"] = time.perf_counter() - t0
        out["payload_bytes"], out["parts"] = payload, parts
    else:
        from opd.actors.learner import LearnerActor
        from opd.batch import OutputHead
        from opd.models import DTYPES

        actor = LearnerActor(cfg)
        out["construct_s"] = time.perf_counter() - t0
        teacher_config = AutoConfig.from_pretrained(model_source(cfg.model.teacher)).get_text_config()
        g = torch.Generator().manual_seed(3)
        head = torch.randn(teacher_config.vocab_size, teacher_config.hidden_size, generator=g) * 0.02  # fp32
        actor.set_teacher_head(OutputHead(head, actor.vocab_size))
        del head
        out["constructed_rss_bytes"] = _status()["VmRSS"]
        vocab, dtype, d_t = actor.vocab_size, DTYPES[cfg.model.dtype], teacher_config.hidden_size
        t0 = time.perf_counter()
        warm = synthetic_batch(args.warmup, args.prompt, args.response, vocab, actor.version, seed=1, budget=args.budget)
        actor.train_step(warm, SyntheticParts(warm, args.budget, d_t, dtype, seed=1))
        del warm
        out["warmup_s"] = time.perf_counter() - t0
        actor.optimizer.zero_grad(set_to_none=True)  # what train_step does first: the baseline holds no gradients
        batch = synthetic_batch(args.batch, args.prompt, args.response, vocab, actor.version, seed=2, budget=args.budget)
        scores = SyntheticParts(batch, args.budget, d_t, dtype, seed=2)
        out["payload_bytes"] = batch.num_response_tokens * d_t * dtype.itemsize
        baseline = _reset_peak()
        t0 = time.perf_counter()
        metrics = actor.train_step(batch, scores)
        out["step_s"] = time.perf_counter() - t0
        out["micro_batches"] = metrics["learner/micro_batches"]
        actor.shutdown()
    peak = _status()["VmHWM"]
    out.update(baseline_rss_bytes=baseline, peak_rss_bytes=peak, growth_bytes=peak - baseline)
    return out


# ---------------------------------------------------------------- in the parent


def model_folders(kind: str, where: Path) -> tuple[str, str]:
    if kind == "tiny":
        return "", ""  # tiny_cpu's own toy models
    from opd.shapes import build_pair

    student, teacher = build_pair("qwen25_1p5b_7b", where, num_layers=2)
    return str(student), str(teacher)


def planned(args, student: str, teacher: str) -> dict:
    """The memory plan's terms for the measured actor: its absolute peak, and the growth over the measured
    baseline (teacher: the step's terms; learner: the step's terms, the gradients of earlier micro-batches among
    them: the optimizer step frees them, so the baseline between steps holds none)."""
    from opd import memory
    from opd.memory_device import Device

    ns = argparse.Namespace(**{**vars(args), "student": student, "teacher": teacher})
    cfg = make_config(ns)
    p = memory.plan(cfg, Device.cpu(), prompt_tokens=args.prompt)
    a = p.actors[args.which]
    terms = a.breakdown()
    if args.which == "teacher":
        step = terms["states in flight"] + terms["forward transients"]
        absolute = a.persistent_bytes + step
    else:
        step = sum(t.bytes for t in a.terms if not t.persistent and t.phase == "step")
        absolute = a.persistent_bytes + step
    return {"plan_peak_bytes": absolute, "plan_growth_bytes": step, "plan_terms": terms}


def run_one(args, student: str, teacher: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--which", args.which, "--batch",
           str(args.batch), "--budget", str(args.budget), "--prompt", str(args.prompt), "--response",
           str(args.response), "--threads", str(args.threads), "--warmup", str(args.warmup), "--dtype", args.dtype,
           "--compute", args.compute, "--models", args.models, "--student", student, "--teacher", teacher]
    if args.checkpointing:
        cmd.append("--checkpointing")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MIB), "OMP_NUM_THREADS": str(args.threads),
           "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"which": args.which, "batch": args.batch, "budget": args.budget, "error": proc.stderr[-2000:],
                "returncode": proc.returncode}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_s"] = time.perf_counter() - t0
    return {**result, **planned(args, student, teacher)}


def table(rows: list[dict]) -> str:
    head = (f"{'actor':8} {'models':6} {'B':>4} {'budget':>6} {'ckpt':>4} {'comp':>4} {'step s':>7} {'base GiB':>8} "
            f"{'peak GiB':>8} {'plan':>6} {'err':>5} {'growth MiB':>10} {'plan':>7} {'err':>5} {'payload MiB':>11}")
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['which']:8} B={r['batch']} budget={r['budget']}: failed (rc {r['returncode']})")
            continue
        g = 1 << 30
        compute = SHORT[r.get("compute", "float32")] if r["which"] == "learner" else "-"
        err_peak = r["plan_peak_bytes"] / r["peak_rss_bytes"] - 1
        err_growth = r["plan_growth_bytes"] / r["growth_bytes"] - 1
        lines.append(f"{r['which']:8} {r['models']:6} {r['batch']:>4} {r['budget']:>6} "
                     f"{'y' if r.get('checkpointing') else 'n':>4} {compute:>4} "
                     f"{r['step_s']:>7.1f} "
                     f"{r['baseline_rss_bytes'] / g:>8.2f} {r['peak_rss_bytes'] / g:>8.2f} "
                     f"{r['plan_peak_bytes'] / g:>6.2f} {err_peak:>+5.0%} {r['growth_bytes'] / MIB:>10.0f} "
                     f"{r['plan_growth_bytes'] / MIB:>7.0f} {err_growth:>+5.0%} {r['payload_bytes'] / MIB:>11.0f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--which", default="both", choices=("teacher", "learner", "both"))
    ap.add_argument("--batches", default="16,32", help="comma-separated sequence counts")
    ap.add_argument("--budgets", default="2048,0", help="comma-separated micro_batch_tokens (0: whole batch)")
    ap.add_argument("--models", default="qwen", choices=("qwen", "tiny"))
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--response", type=int, default=256)
    ap.add_argument("--dtype", default="bfloat16", help="model.dtype (teacher weights, its states)")
    ap.add_argument("--compute", default="float32", help="learner.compute_dtype")
    ap.add_argument("--checkpointing", action="store_true", help="learner.gradient_checkpointing")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=2, help="sequences of the warm-up call")
    ap.add_argument("--out", default="", help="append one JSON line per measurement to this file")
    ap.add_argument("--table", default="", help="print the table of a results file and exit")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=16, help=argparse.SUPPRESS)
    ap.add_argument("--budget", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--student", default="", help=argparse.SUPPRESS)
    ap.add_argument("--teacher", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.table:  # the plan's numbers from the current opd/memory.py
        rows = [json.loads(line) for line in Path(args.table).read_text().splitlines() if line.strip()]
        with tempfile.TemporaryDirectory(prefix="opd-step-memory-") as tmp:
            folders = {kind: model_folders(kind, Path(tmp) / kind) for kind in {r.get("models", "qwen") for r in rows}}
            for r in rows:
                if "error" not in r:
                    like = argparse.Namespace(**{**vars(args), **{k: r[k] for k in (
                        "which", "batch", "budget", "prompt", "response", "compute", "checkpointing", "threads",
                        "models")}, "dtype": r["dtype"]})
                    r.update(planned(like, *folders[r["models"]]))
        print(table(rows))
        return 0
    if args.child:
        print(json.dumps(child(args)))
        return 0
    if args.models == "tiny":  # the toy's prompts and answers are 6 tokens each
        args.prompt, args.response = min(args.prompt, 6), min(args.response, 6)
    rows = []
    with tempfile.TemporaryDirectory(prefix="opd-step-memory-") as tmp:
        student, teacher = model_folders(args.models, Path(tmp))
        for which in (("teacher", "learner") if args.which == "both" else (args.which,)):
            for budget in [int(x) for x in args.budgets.split(",")]:
                for batch in [int(x) for x in args.batches.split(",")]:
                    one = argparse.Namespace(**{**vars(args), "which": which, "batch": batch, "budget": budget})
                    row = run_one(one, student, teacher)
                    rows.append(row)
                    if args.out:
                        with open(args.out, "a") as f:
                            f.write(json.dumps(row) + "\n")
                    print(table([row]).splitlines()[-1], flush=True)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
