"""On-policy distillation, one step per loop: rollout -> teacher score -> learner step -> weight sync.

    python driver.py                                  # the embedded default (preset tiny_cpu)
    python driver.py --preset tiny_cpu --set loss.kind=jsd --set train.steps=200
    ray job submit --working-dir . -- python driver.py --set run.out_dir=$PWD/runs
"""

from __future__ import annotations

import argparse
import sys
import time

from opd.config import Config, ConfigError, override, preset


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


def run(cfg: Config) -> dict:
    from opd.preflight import preflight

    prepared = preflight(cfg)  # every refusal happens here, before Ray starts
    run_dir = prepared.run_dir
    import ray
    from tqdm import tqdm

    from cluster import topology
    from opd.data import PromptStream, student_ids, teacher_ids
    from opd.evaluation import evaluate
    from opd.metrics import RunLog, plot_learning_curve
    from actors.common import model_source
    from opd.models import load_tokenizer

    started_ray = topology.connect(cfg)
    actors = None
    try:
        actors = topology.launch(cfg)
        tokenizer = load_tokenizer(model_source(cfg.model.student))
        stream = PromptStream(prepared.prompts.train, cfg.train.seed)
        log = RunLog(run_dir)
        log.log_data_counts(prepared.prompts.counts)

        # The teacher's output head reaches the learner once (frozen); the learner's weights reach the engine
        # once as a shared-buffer handle, after which a sync only publishes the version.
        ray.get(actors.learner.set_teacher_head.remote(actors.teacher.output_head.remote()))
        version = actors.sync()

        def run_eval(step: int, teacher_accuracy=None) -> dict:
            metrics = evaluate(actors, prepared.prompts, tokenizer, cfg.rollout.max_new_tokens, teacher_accuracy)
            log.log_eval(step, metrics)
            return metrics

        before = last = run_eval(0)
        bar = tqdm(range(1, cfg.train.steps + 1), desc="opd", disable=not cfg.run.progress, dynamic_ncols=True)
        def rollout(step: int):
            prompts = stream.next_batch(cfg.train.prompts_per_step)
            return prompts, actors.generate(student_ids(prompts), seed=cfg.train.seed * 1_000_003 + step)

        upcoming = None  # run.overlap: the next step's rollout, sampled while the learner trains
        for step in bar:
            t0 = time.perf_counter()
            # The engines hold version `version` (checked after the last sync): the samples are on-policy, or with
            # run.overlap one version behind (sampled during the previous step's training).
            prompts, batch = upcoming or rollout(step)
            ray.wait([batch], fetch_local=False)  # timing only: the batch goes actor to actor, not via here
            t1 = time.perf_counter()
            scores = actors.score(batch, teacher_prompts=teacher_ids(prompts))
            ray.wait(scores, fetch_local=False)
            t2 = time.perf_counter()
            result = actors.train_step(batch, scores)
            upcoming = rollout(step + 1) if cfg.run.overlap and step < cfg.train.steps else None
            metrics = ray.get(result)
            t3 = time.perf_counter()
            if upcoming is not None:  # the next samples must be finished before the sync rewrites the weights
                ray.wait([upcoming[1]], fetch_local=False)
            t4 = time.perf_counter()
            version = actors.sync()
            t5 = time.perf_counter()
            if version != metrics["policy/version"]:
                raise RuntimeError(f"engine holds weights v{version}, learner is at v{metrics['policy/version']}")
            metrics.update({"timing/rollout_s": t1 - t0, "timing/teacher_s": t2 - t1, "timing/train_s": t3 - t2,
                            "timing/overlap_wait_s": t4 - t3, "timing/sync_s": t5 - t4, "timing/step_s": t5 - t0,
                            "throughput/tokens_per_s": metrics["response/tokens/sum"] / (t5 - t0)})
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
