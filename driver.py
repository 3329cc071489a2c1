"""On-policy distillation, one step per loop: rollout -> teacher score -> learner step -> weight sync.

    python driver.py                                  # the embedded default (preset tiny_cpu)
    python driver.py --preset tiny_cpu --set loss.kind=jsd --set train.steps=200
    ray job submit --working-dir . -- python driver.py --set run.out_dir=$PWD/runs
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from pathlib import Path

from opd.config import Config, ConfigError, override, preset, resolve_path

TOY_ASSETS = "assets/toy"  # the embedded default's tokenizer, teacher and student (python -m opd.toy)


def parse_args(argv: list[str] | None = None) -> Config:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny_cpu", help="a preset of opd/config.py (default: tiny_cpu)")
    parser.add_argument("--mode", help="cpu | colocated | split (shorthand for --set run.mode=...)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override one setting; repeatable")
    args = parser.parse_args(argv)
    cfg = preset(args.preset)
    for assignment in ([f"run.mode={args.mode}"] if args.mode else []) + args.set:
        cfg = override(cfg, assignment)
    return cfg


def prepare(cfg: Config) -> Path:
    """Everything that can refuse the run does so here, before Ray starts. Returns the run directory."""
    from cluster.resources import check_devices
    from opd import toy

    for side in ("student", "teacher"):
        path = resolve_path(getattr(cfg.model, side))
        if path == resolve_path(TOY_ASSETS) / side:
            toy.ensure_assets(resolve_path(TOY_ASSETS))  # the embedded models: built once, then cached
        if not (path / "config.json").is_file():
            raise ConfigError(f"model.{side}={getattr(cfg.model, side)}: no Hugging Face model folder (config.json) "
                              f"at {path}; give a local model folder")
    check_devices(cfg)
    out_dir = Path(cfg.run.out_dir).expanduser()
    if not out_dir.is_absolute() and "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ:
        print(f"warning: run.out_dir={cfg.run.out_dir} is relative; inside a Ray job it lands in the job's temporary "
              f"working_dir. Pass an absolute path (--set run.out_dir=$PWD/runs).", file=sys.stderr)
    name = cfg.run.name or datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = out_dir.resolve() / name
    try:
        run_dir.mkdir(parents=True, exist_ok=False)
    except FileExistsError:
        raise ConfigError(f"run directory {run_dir} exists: pick another run.name") from None
    except OSError as e:
        raise ConfigError(f"run.out_dir={cfg.run.out_dir}: cannot create {run_dir} ({e.strerror})") from None
    from opd.metrics import write_json_atomic

    write_json_atomic(run_dir / "config.json", cfg.to_dict())
    return run_dir


def run(cfg: Config) -> dict:
    run_dir = prepare(cfg)
    import ray
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from cluster import topology
    from opd.data import PromptStream, eval_prompts
    from opd.evaluation import evaluate
    from opd.metrics import RunLog, plot_learning_curve

    started_ray = topology.connect(cfg)
    actors = None
    try:
        actors = topology.launch(cfg)
        tokenizer = AutoTokenizer.from_pretrained(resolve_path(cfg.model.student))
        stream = PromptStream(tokenizer, cfg.train.seed)
        eval_ids, eval_texts = eval_prompts(tokenizer, cfg.data.num_eval_prompts)
        log = RunLog(run_dir)

        # The teacher's output head reaches the learner once (frozen); the learner's weights reach the engine
        # once as a shared-buffer handle, after which a sync only publishes the version.
        ray.get(actors.learner.set_teacher_head.remote(actors.teacher.output_head.remote()))
        version = ray.get(actors.rollout.load_weights.remote(actors.learner.export_weights.remote()))

        def run_eval(step: int, teacher_accuracy=None) -> dict:
            metrics = evaluate(actors, eval_ids, eval_texts, tokenizer, cfg.rollout.max_new_tokens, teacher_accuracy)
            log.log_eval(step, metrics)
            return metrics

        before = last = run_eval(0)
        bar = tqdm(range(1, cfg.train.steps + 1), desc="opd", disable=not cfg.run.progress, dynamic_ncols=True)
        for step in bar:
            t0 = time.perf_counter()
            # The rollout holds version `version` (checked after the last sync), so generate samples on-policy.
            batch = actors.rollout.generate.remote(stream.next_batch(cfg.train.prompts_per_step),
                                                   seed=cfg.train.seed * 1_000_003 + step)
            ray.wait([batch], fetch_local=False)  # timing only: the batch goes actor to actor, not via here
            t1 = time.perf_counter()
            scores = actors.teacher.score.remote(batch)
            ray.wait([scores], fetch_local=False)
            t2 = time.perf_counter()
            metrics = ray.get(actors.learner.train_step.remote(batch, scores))
            t3 = time.perf_counter()
            version = ray.get(actors.rollout.load_weights.remote(actors.learner.export_weights.remote()))
            t4 = time.perf_counter()
            if version != metrics["policy/version"]:
                raise RuntimeError(f"engine holds weights v{version}, learner is at v{metrics['policy/version']}")
            metrics.update({"timing/rollout_s": t1 - t0, "timing/teacher_s": t2 - t1, "timing/train_s": t3 - t2,
                            "timing/sync_s": t4 - t3, "timing/step_s": t4 - t0,
                            "throughput/tokens_per_s": metrics["response/tokens/sum"] / (t4 - t0)})
            log.log_step(step, metrics)
            rkl = metrics.get("kl/reverse/mean", metrics.get("kl/reverse/sampled_mean"))
            bar.set_postfix({"rkl": f"{rkl:.3f}", "len": f"{metrics['response/length/mean']:.1f}"})
            if step == cfg.train.steps or (cfg.train.eval_every and step % cfg.train.eval_every == 0):
                last = run_eval(step, before["eval/accuracy/teacher"])
                bar.write(f"step {step}: student accuracy {last['eval/accuracy/student']:.1%}, "
                          f"held-out reverse KL {last['eval/kl/reverse/mean']:.4f}")
        checkpoint = ray.get(actors.learner.save.remote(str(run_dir / "checkpoint")))
        log.close()
        plot_learning_curve(run_dir)
    finally:
        if actors is not None:
            actors.shutdown()
        if started_ray:
            ray.shutdown()
    summary = {"run_dir": str(run_dir), "checkpoint": checkpoint, "before": before, "after": last}
    print_summary(summary)
    return summary


def print_summary(summary: dict) -> None:
    b, a = summary["before"], summary["after"]
    print(f"\nrun directory: {summary['run_dir']}")
    print(f"  student accuracy     {b['eval/accuracy/student']:7.1%} -> {a['eval/accuracy/student']:7.1%}"
          f"   (teacher {a['eval/accuracy/teacher']:.1%})")
    print(f"  held-out reverse KL  {b['eval/kl/reverse/mean']:7.4f} -> {a['eval/kl/reverse/mean']:7.4f}")
    print(f"  held-out forward KL  {b['eval/kl/forward/mean']:7.4f} -> {a['eval/kl/forward/mean']:7.4f}")


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_args(argv)
        run(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
