"""On-policy distillation, one step per loop: rollout -> teacher score -> learner step -> weight sync.

    python driver.py                                  # the embedded default (preset tiny_cpu)
    python driver.py --preset tiny_cpu --set loss.kind=jsd --set train.steps=200
    python driver.py --config configs/smollm2_cpu.yaml    # settings from a YAML / JSON file (over the preset)
    python driver.py --preset smollm2_cpu --print-config  # the resolved config as YAML, nothing run
    python driver.py --resume runs/<name>                 # continue a run from its latest checkpoint
    ray job submit --working-dir . -- $PWD/.venv/bin/python driver.py --set run.out_dir=$PWD/runs
"""

from __future__ import annotations

import argparse
import sys
import time

from opd.config import Config, ConfigError, override, preset
from opd.metrics import RunStopped


def parse_args(argv: list[str] | None = None) -> Config:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", help="a preset of opd/config.py (default: tiny_cpu)")
    parser.add_argument("--resume", metavar="RUN_DIR",
                        help="continue RUN_DIR from its latest checkpoint with the run's own config (its config.json); "
                             "--set may change train.steps and other settings that leave the math alone")
    parser.add_argument("--config", metavar="FILE",
                        help="settings from a YAML or JSON file (section: {field: value}), applied over the preset "
                             "and under --mode / --set")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config as YAML (a file --config takes back) and exit")
    parser.add_argument("--mode", help="cpu | colocated | split (shorthand for --set run.mode=...)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override one setting; repeatable")
    parser.add_argument("--bench", action="store_true",
                        help="benchmark mode: timed steps per phase with a roofline (programs/bench.py, bench.* settings)")
    args = parser.parse_args(argv)
    args.set += ["bench.enabled=true"] if args.bench else []
    if args.resume and (args.preset or args.mode or args.config):
        raise ConfigError("--resume continues a run with its own config (RUN_DIR/config.json): "
                          "drop --preset / --mode / --config")
    if args.resume:
        from opd.checkpoint import load_run_config

        cfg = load_run_config(args.resume)
    else:
        cfg = preset(args.preset or "tiny_cpu")
    if args.config:
        from opd.configfile import load_tree, merge

        cfg = merge(cfg, load_tree(args.config), f"--config {args.config}")
    for assignment in ([f"run.mode={args.mode}"] if args.mode else []) + args.set:
        cfg = override(cfg, assignment)
    if args.print_config:
        from opd.configfile import to_yaml

        print(to_yaml(cfg), end="")
        raise SystemExit(0)
    return cfg


def run(cfg: Config) -> dict:
    from opd.preflight import preflight

    prepared = preflight(cfg)  # every refusal happens here, before Ray starts
    run_dir = prepared.run_dir
    from opd.trackers import Trackers

    trackers = Trackers(cfg, run_dir)  # run.loggers, opened before Ray starts: a tracker that fails, fails first
    import ray
    from tqdm import tqdm

    from cluster import topology
    from opd.prompt_sets import PromptStream, student_ids, teacher_ids
    from programs.evaluation import evaluate
    from opd.checkpoint import Checkpoints
    from opd import report
    from opd.metrics import RunLog, SkipGuard, plot_learning_curve
    from opd.models import load_tokenizer, model_source

    started_ray = topology.connect(cfg)
    actors = None
    try:
        actors = topology.launch(cfg)
        tokenizer = load_tokenizer(model_source(cfg.model.student))
        stream = PromptStream(prepared.prompts.train, cfg.train.seed)
        skips = SkipGuard(cfg.train.max_consecutive_skips, run_dir)
        checkpoints = Checkpoints(cfg, run_dir, actors.learner, stream, skips)
        # --resume: the learner's weights (in place), optimizer, scheduler and RNG, the data cursor and the step;
        # before the first sync below hands the weights to the engine
        start = checkpoints.restore(prepared.resume_from)
        log = RunLog(run_dir, trackers)
        log.log_data_counts(prepared.prompts.counts)

        # The teacher's output head reaches the learner once (frozen); the learner's weights reach the engine
        # once as a shared-buffer handle, after which a sync only publishes the version.
        ray.get(actors.learner.set_teacher_head.remote(actors.teacher.output_head.remote()))
        version = actors.sync()

        def run_eval(step: int, teacher_accuracy=None) -> dict:
            metrics = evaluate(actors, prepared.prompts, tokenizer, cfg.rollout.max_new_tokens, teacher_accuracy)
            log.log_eval(step, metrics)
            return metrics

        # a resumed run's evaluations so far are in eval.jsonl (step 0's holds the teacher's accuracy)
        before, last = (log.eval_rows[0], log.eval_rows[-1]) if log.eval_rows else (run_eval(0),) * 2
        bar = tqdm(range(start + 1, cfg.train.steps + 1), desc="opd", disable=not cfg.run.progress, dynamic_ncols=True)
        def seed_of(step: int) -> int:
            return cfg.train.seed * 1_000_003 + step

        def rollout(step: int):
            prompts = stream.next_batch(cfg.train.prompts_per_step)
            return prompts, actors.generate(student_ids(prompts), seed=seed_of(step))

        upcoming = None  # run.overlap: the next step's rollout, sampled while the learner trains
        for step in bar:
            t0 = time.perf_counter()
            # The engines hold version `version` (checked after the last sync): the samples are on-policy, or with
            # run.overlap one version behind (sampled during the previous step's training).
            prompts, batch = upcoming or rollout(step)
            metrics, retries = None, 0
            while True:
                try:
                    if metrics is None:  # not trained yet: (re)score and train; a retry resamples first
                        ray.wait([batch], fetch_local=False)  # timing only: the batch goes actor to actor
                        t1 = time.perf_counter()
                        scores = actors.score(batch, teacher_prompts=teacher_ids(prompts))
                        actors.wait_scored(scores)
                        t2 = time.perf_counter()
                        result = actors.train_step(batch, scores)
                        upcoming = rollout(step + 1) if cfg.run.overlap and step < cfg.train.steps else None
                        metrics = ray.get(result)
                        t3 = time.perf_counter()
                        if upcoming is not None:  # the next samples must be done before the sync rewrites weights
                            ray.wait([upcoming[1]], fetch_local=False)
                    t4 = time.perf_counter()
                    version = actors.sync()
                    t5 = time.perf_counter()
                    break
                except ray.exceptions.RayActorError as e:  # a rollout or teacher process died: restart, retry
                    retries += 1
                    bar.write(f"step {step}: {type(e).__name__}; restarting the actor and retrying the step")
                    actors.recover(step, e, run_dir)  # stops the run if the learner died
                    if metrics is None:  # the same prompts and seed, sampled again by the current weights
                        batch, upcoming = actors.generate(student_ids(prompts), seed=seed_of(step)), None
            if version != metrics["policy/version"]:
                raise RuntimeError(f"engine holds weights v{version}, learner is at v{metrics['policy/version']}")
            metrics.update({"timing/rollout_s": t1 - t0, "timing/teacher_s": t2 - t1, "timing/train_s": t3 - t2,
                            "timing/overlap_wait_s": t4 - t3, "timing/sync_s": t5 - t4, "timing/step_s": t5 - t0,
                            "throughput/tokens_per_s": metrics["response/tokens/sum"] / (t5 - t0),
                            "step/actor_restarts": float(retries)})
            log.log_step(step, metrics)
            skips.check(step, metrics)  # stops the run after train.max_consecutive_skips skipped steps in a row
            rkl = metrics.get("kl/reverse/mean", metrics.get("kl/reverse/sampled_mean"))
            bar.set_postfix({"rkl": f"{rkl:.3f}", "len": f"{metrics['response/length/mean']:.1f}"})
            if step == cfg.train.steps or (cfg.train.eval_every and step % cfg.train.eval_every == 0):
                last = run_eval(step, before["eval/accuracy/teacher"])
                bar.write(f"step {step}: student accuracy {last['eval/accuracy/student']:.1%}, "
                          f"held-out reverse KL {last['eval/kl/reverse/mean']:.4f}")
            checkpoints.after_step(step)  # every train.save_every steps and at the end, after that step's eval
        log.close()
        plot_learning_curve(run_dir)
        report.write(run_dir)  # report.html: summary, curves, checkpoints, config
    finally:
        trackers.close()  # after log.close(), nothing is left open; on an error, what was logged is kept
        if actors is not None:
            actors.shutdown()
        if started_ray:
            ray.shutdown()
    summary = {"run_dir": str(run_dir), "checkpoint": checkpoints.last, "before": before, "after": last}
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
        if cfg.bench.enabled:
            from programs.bench import run_bench

            run_bench(cfg)
        else:
            run(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RunStopped as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
