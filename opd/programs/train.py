"""On-policy distillation, one step per loop: rollout -> teacher score -> learner step -> weight sync
(`python driver.py` and `opd train` run `main` here).

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

from opd.config import Config, ConfigError
from opd.metrics import Interrupted, RunStopped
from opd.overrides import override
from opd.presets import preset


def parse_args(argv: list[str] | None = None) -> Config:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", help="a preset of opd/presets.py (default: tiny_cpu)")
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
                        help="benchmark mode: timed steps per phase with a roofline (opd/programs/bench.py, bench.* settings)")
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
    from opd.trackers import Trackers

    prepared = preflight(cfg)  # every refusal happens here, before Ray starts
    trackers = Trackers(cfg, prepared.run_dir)  # run.loggers, opened before Ray starts: one that fails, fails first
    from opd.cluster import topology  # Ray is imported only once the config has passed

    try:
        with topology.running(cfg) as actors:  # stops the actors, and a Ray it started, however the run ends
            summary = train(cfg, prepared, actors, trackers)
    except Exception as e:  # after preflight: one line and what to do; the traceback goes to RUN_DIR/error.log
        raise RunStopped(failure(e, prepared.run_dir)) from e
    finally:
        trackers.close()  # after the run's log is closed; on an error, what was logged is kept
        prepared.lock.release()  # the run directory is free for a --resume
    print_summary(summary)
    return summary


def train(cfg: Config, prepared, actors, trackers) -> dict:
    """The run over its actors: evaluation before the first step, then each step logged, checked, evaluated
    and checkpointed; the report at the end."""
    from tqdm import tqdm

    from opd.checkpoint import Checkpoints
    from opd.metrics import RunLog, SkipGuard
    from opd.models import load_tokenizer, model_source
    from opd.prompt_sets import PromptStream
    from opd.programs.evaluation import HeldOut
    from opd.programs.rollouts import Rollouts
    from opd.programs.step import Step

    run_dir, stream = prepared.run_dir, PromptStream(prepared.prompts.train, cfg.train.seed)
    skips = SkipGuard(cfg.train.max_consecutive_skips, run_dir)
    checkpoints = Checkpoints(cfg, run_dir, actors, stream, skips)
    # --resume: the learner's weights (in place), optimizer, scheduler and RNG, the data cursor and the step;
    # before the first sync below hands the weights to the engine
    start = checkpoints.restore(prepared.resume_from)
    log = RunLog(run_dir, trackers)
    log.log_data_counts(prepared.prompts.counts)
    # The teacher's output head reaches the learner once (frozen); the learner's weights reach the engine
    # once as a shared-buffer handle, after which a sync only publishes the version.
    actors.teacher_head_to_learners()
    actors.sync_weights()
    tokenizer = load_tokenizer(model_source(cfg.model.student))
    held_out = HeldOut(cfg, actors, prepared.prompts, log, tokenizer)
    bar = tqdm(range(start + 1, cfg.train.steps + 1), desc="opd", disable=not cfg.run.progress, dynamic_ncols=True)
    step_once = Step(cfg, actors, Rollouts(cfg, actors, stream, tokenizer), say=bar.write, run_dir=run_dir)
    with StopSignals(bar.write, run_dir) as stop, Records(log, run_dir):  # the records are written however it ends
        for step in bar:
            metrics = step_once(step)  # rollout -> teacher -> learner -> sync (opd/programs/step.py)
            log.log_step(step, metrics)
            skips.check(step, metrics)  # stops the run after train.max_consecutive_skips skipped steps in a row
            rkl = metrics.get("kl/reverse/mean", metrics.get("kl/reverse/sampled_mean"))
            bar.set_postfix({"rkl": f"{rkl:.3f}", "len": f"{metrics['response/length/mean']:.1f}"})
            if held_out.due(step):
                last = held_out.run(step)
                bar.write(f"step {step}: student accuracy {last['eval/accuracy/student']:.1%}, "
                          f"held-out reverse KL {last['eval/kl/reverse/mean']:.4f}")
            # every train.save_every steps, at the end and where a signal stops the run, after that step's eval
            checkpoints.after_step(step, stopping=stop.signum is not None)
            if stop.signum is not None:
                stop.stopped_after(step)
    return {"run_dir": str(run_dir), "checkpoint": checkpoints.last, "before": held_out.before, "after": held_out.last}


class StopSignals:
    """SIGINT and SIGTERM during the run: the first lets the step finish, saves a checkpoint there and stops
    (`stopped_after`); a second stops at once. Installed after Ray started, so they replace Ray's own handlers
    (its C++ SIGTERM dump, its KeyboardInterrupt from inside a wait)."""

    def __init__(self, say, run_dir):
        self.say, self.run_dir, self.signum, self._previous = say, run_dir, None, {}

    def __enter__(self) -> StopSignals:
        import signal

        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        import signal

        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame) -> None:
        import signal

        from opd import checkpoint

        name = signal.Signals(signum).name
        if self.signum is not None:
            latest = checkpoint.latest(self.run_dir)
            raise Interrupted(signum, f"stopped at once by a second {name}; " + (
                f"continue from {latest.name} with: python driver.py --resume {self.run_dir}" if latest else
                "no checkpoint was written yet: start the run again"))
        self.signum = signum
        self.say(f"{name}: stopping after this step, with a checkpoint (again: at once)")

    def stopped_after(self, step: int) -> None:
        import signal

        raise Interrupted(self.signum, f"stopped by {signal.Signals(self.signum).name} after step {step} (checkpoint "
                                       f"step_{step}); continue with: python driver.py --resume {self.run_dir}")


class Records:
    """metrics.parquet, the learning curve and report.html, written when the run ends, whichever way: after an
    error or a second signal too (then a failure among them is a warning, and the original goes on)."""

    def __init__(self, log, run_dir):
        self.log, self.run_dir = log, run_dir

    def __enter__(self) -> Records:
        return self

    def __exit__(self, kind, error, tb) -> None:
        from opd import report
        from opd.metrics import plot_learning_curve

        try:
            self.log.close()
            plot_learning_curve(self.run_dir)
            report.write(self.run_dir)  # report.html: summary, curves, checkpoints, config
        except Exception as e:
            if kind is None or kind is Interrupted and "after step" in str(error):
                raise
            print(f"warning: the run's records were not all written ({type(e).__name__}: {e})", file=sys.stderr)


def failure(error: BaseException, run_dir) -> str:
    """A run that failed after preflight, in one line: what failed, where, and how to go on from the last
    checkpoint (the full traceback is kept in RUN_DIR/error.log, when the run directory takes it)."""
    import errno
    import traceback

    from opd import checkpoint

    if isinstance(error, RunStopped):
        return str(error)
    cause = getattr(error, "cause", None) or error  # a Ray task's error carries the actor's exception
    kept = ""
    try:
        (run_dir / "error.log").write_text("".join(traceback.format_exception(error)))
        kept = f" (traceback: {run_dir / 'error.log'})"
    except OSError:
        pass
    if isinstance(cause, OSError) and cause.strerror:
        what = f"{cause.strerror}: {cause.filename}" if cause.filename else cause.strerror
        todo = {errno.ENOSPC: "free disk space", errno.EDQUOT: "free disk space", errno.EROFS: f"make {run_dir} "
                "writable", errno.EACCES: f"make {run_dir} writable"}.get(cause.errno, "fix that")
    else:
        what = f"{type(cause).__name__}: {(str(cause).strip().splitlines() or [''])[0]}"
        todo = "fix that"
    latest = checkpoint.latest(run_dir)
    then = (f"then continue from {latest.name} with: python driver.py --resume {run_dir}" if latest else
            "then start the run again (it wrote no checkpoint)")
    return f"the run failed: {what}{kept}; {todo}, {then}"


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
            from opd.programs.bench import run_bench

            run_bench(cfg)
        else:
            run(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RunStopped as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Interrupted as e:
        print(f"{e}", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:  # before the run's own handlers (preflight, Ray starting): nothing to save yet
        print("stopped (SIGINT) before the first step; nothing was trained", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
