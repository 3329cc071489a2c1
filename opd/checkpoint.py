"""Checkpoints for exact resume, written atomically.

`run_dir/checkpoints/step_<N>/` holds the student in Hugging Face format (`save_pretrained`, safetensors) with
its tokenizer, so `from_pretrained(step_<N>)` works as is, and beside it:

* `trainer_state.pt`: the learner's optimizer, LR-scheduler and RNG states and its policy version; with
  run.learner_replicas=N > 1 the optimizer state is sharded instead, each replica's shards in `optimizer/`
  (torch.distributed.checkpoint), and each further replica's RNG in `rng_rank<r>.pt`;
* `run_state.json`: the driver's side: the step, the data cursor (`PromptStream.state()`), the skip streak, and
  the resolved config, which a resume is checked against;
* `manifest.json`, written last: every other file with its size and sha256. A step directory without it is not
  a checkpoint.

A checkpoint is filled in a temporary sibling (`.step_<N>.tmp-*`) and renamed into place, so a crash at any
moment leaves the earlier checkpoints intact and at worst a temporary folder, which is ignored and cleaned up.
Old checkpoints are removed the same way round: renamed away first, then deleted.

What the resume does not need to store: the rollout engine re-seeds its sampler at every step from
`train.seed` and the step, evaluation from its own fixed seed, and the teacher draws no random numbers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import re
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from opd.config import Config, ConfigError
from opd.overrides import config_from_dict

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.pt"
RUN_STATE = "run_state.json"
_STEP_DIR = re.compile(r"step_(\d+)")
_PARTIAL = ".step_*.tmp-*"  # an interrupted write (or delete)

# Settings a resumed run may change: they leave the math of the remaining steps alone (train.steps stretches a
# decaying LR schedule; `check_compatible` warns about that). Any other difference refuses the resume.
RESUMABLE = frozenset({"train.steps", "train.eval_every", "train.save_every", "train.keep_checkpoints",
                       "train.max_consecutive_skips", "run.out_dir", "run.name", "run.resume", "run.ray_address",
                       "run.cpus_per_actor", "run.threads_per_actor", "run.progress", "run.max_actor_restarts",
                       # memory knobs: the same loss and gradient, summed in another order (not bit-exact)
                       "learner.micro_batch_tokens", "learner.gradient_checkpointing", "teacher.micro_batch_tokens"})


def step_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step_{step}"


# ---------------------------------------------------------------- atomic directory, manifest


def write(path: Path, fill: Callable[[Path], None], run_state: dict) -> Path:
    """Write the checkpoint `path` (a `step_<N>` folder): `fill(tmp)` writes the files into a temporary sibling,
    then run_state.json and the manifest follow, everything is flushed to disk, and the folder is renamed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        fill(tmp)
        (tmp / RUN_STATE).write_text(json.dumps(run_state, indent=2) + "\n")
        files = {f.relative_to(tmp).as_posix(): {"bytes": f.stat().st_size, "sha256": _sha256(f, sync=True)}
                 for f in sorted(tmp.rglob("*")) if f.is_file()}
        manifest = tmp / MANIFEST
        manifest.write_text(json.dumps({"format": 1, "files": files}, indent=2) + "\n")
        _permissions_of_umask(tmp)
        _fsync(manifest)
        _fsync(tmp)
        if path.exists():  # the same step saved again: the new one replaces it
            _remove(path)
        os.rename(tmp, path)
        _fsync(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _permissions_of_umask(folder: Path) -> None:
    """mkdtemp makes the folder 0700: give it, and what is in it, the modes this user's umask gives any file, so
    another process or user can `from_pretrained` a checkpoint as they could any folder of this user's."""
    umask = os.umask(0o022)  # read it (the only portable way), then put it back
    os.umask(umask)
    for p in (folder, *folder.rglob("*")):
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)


def verify(path: Path) -> dict:
    """The manifest of a complete, intact checkpoint; a ConfigError naming the first bad file otherwise, and
    what to do: resume from the checkpoint before it, or, when it is the run's only one, start again."""
    path = Path(path)
    before = [d for s, d in complete(path.parent.parent) if s < step_of(path)]
    fix = (f"delete {path} to resume from {before[-1].name}" if before else
           f"it is the run's only checkpoint: start the run again (python driver.py --config "
           f"{path.parent.parent / 'config.json'} --set run.name=<new name>)")
    try:
        files = json.loads((path / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        raise ConfigError(f"checkpoint {path} is incomplete (no {MANIFEST}): {fix}") from None
    except (ValueError, KeyError, TypeError):
        raise ConfigError(f"checkpoint {path / MANIFEST} is corrupt: {fix}") from None
    for name, entry in files.items():
        f = path / name
        problem = ("is missing" if not f.is_file() else
                   f"has {f.stat().st_size} bytes, the manifest says {entry['bytes']}"
                   if f.stat().st_size != entry["bytes"] else
                   "does not match its sha256 in the manifest" if _sha256(f) != entry["sha256"] else "")
        if problem:
            raise ConfigError(f"checkpoint file {f} {problem} (a corrupt checkpoint): {fix}")
    return files


def step_of(d: Path) -> int:
    m = _STEP_DIR.fullmatch(d.name)
    return int(m.group(1)) if m else -1


def incomplete(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of the step folders without a manifest: interrupted before the rename, or copied partly."""
    return sorted((step_of(d), d) for d in (Path(run_dir) / CHECKPOINTS).glob("step_*")
                  if _STEP_DIR.fullmatch(d.name) and d.is_dir() and not (d / MANIFEST).is_file())


def complete(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of the checkpoints whose manifest exists, oldest first (intact or not: see `verify`)."""
    found = []
    for d in (Path(run_dir) / CHECKPOINTS).glob("step_*"):
        m = _STEP_DIR.fullmatch(d.name)
        if m and (d / MANIFEST).is_file():
            found.append((int(m.group(1)), d))
    return sorted(found)


def latest(run_dir: Path) -> Path | None:
    found = complete(run_dir)
    return found[-1][1] if found else None


def prune(run_dir: Path, keep: int) -> None:
    """Keep the newest `keep` checkpoints; also remove what interrupted writes left behind, step folders without a
    manifest older than the newest checkpoint included (a newer one is replaced when the run gets to its step)."""
    found = complete(run_dir)
    for _, d in found[:-keep]:
        _remove(d)
    for step, d in incomplete(run_dir):
        if found and step < found[-1][0]:
            _remove(d)
    clean_partial(run_dir)


def clean_partial(run_dir: Path) -> list[Path]:
    leftovers = sorted((Path(run_dir) / CHECKPOINTS).glob(_PARTIAL))
    for d in leftovers:
        shutil.rmtree(d, ignore_errors=True)
    return leftovers


def read_run_state(path: Path) -> dict:
    return json.loads((Path(path) / RUN_STATE).read_text())


def _remove(d: Path) -> None:
    # Renamed first (atomic), so a crash mid-delete never leaves a step_<N> folder with a manifest and missing files.
    doomed = d.with_name(f".{d.name}.tmp-deleting")
    shutil.rmtree(doomed, ignore_errors=True)
    os.rename(d, doomed)
    shutil.rmtree(doomed)


def _sha256(f: Path, sync: bool = False) -> str:
    digest = hashlib.sha256()
    with open(f, "rb") as fh:
        while chunk := fh.read(1 << 24):
            digest.update(chunk)
        if sync:
            os.fsync(fh.fileno())  # the bytes are on disk before the manifest vouches for them
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------- the driver's side


class Checkpoints:
    """When the driver saves (every train.save_every steps and at the last step), what it adds to the learner's
    state (step, data cursor, skip streak, config), and the restore of a resumed run."""

    def __init__(self, cfg: Config, run_dir: Path, actors, stream, skips):
        self.cfg, self.run_dir, self.actors, self.stream, self.skips = cfg, Path(run_dir), actors, stream, skips
        self.last: str | None = None  # the newest checkpoint written or restored

    def restore(self, path: Path | None) -> int:
        """Load `path` (verified by preflight) into the learner and the stream; returns its step (0: no resume)."""
        if path is None:
            return 0
        version = self.actors.load_checkpoint(str(path))
        state = read_run_state(path)
        if state.get("policy_version", version) != version:  # each file is whole (the manifest), but together?
            from opd.metrics import RunStopped

            raise RunStopped(f"checkpoint {path}: {RUN_STATE} was written at policy version "
                             f"{state['policy_version']} and {TRAINER_STATE} at {version}: its files come from "
                             f"different checkpoints; resume from another one (delete {path})")
        self.stream.load_state(state["data"])
        self.skips.streak = state["skip_streak"]
        self.last = str(path)
        return state["step"]

    def after_step(self, step: int, *, stopping: bool = False) -> None:
        """Save at train.save_every steps, at the last step, and at the step a signal stops the run after."""
        every = self.cfg.train.save_every
        if stopping or step == self.cfg.train.steps or (every and step % every == 0):
            run_state = {"step": step, "data": self.stream.state(), "skip_streak": self.skips.streak,
                         "config": self.cfg.to_dict()}
            self.last = self.actors.save_checkpoint(str(step_dir(self.run_dir, step)), run_state)


# ---------------------------------------------------------------- the learner's state


def save_learner(path: Path, model, optimizer, scheduler, *, version: int, tokenizer_source: str) -> None:
    """The student (safetensors) and its tokenizer in Hugging Face format, and the training state beside it."""
    from transformers import AutoTokenizer

    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tokenizer_source).save_pretrained(path)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "version": version,
                "rng": rng_state()}, Path(path) / TRAINER_STATE)


def save_sharded(path: Path, student, optimizer, scheduler, *, version: int, tokenizer_source: str, rank: int,
                 replicas: int) -> None:
    """`save_learner` for run.learner_replicas > 1, called by every replica on the same `path` (collectives):
    the whole student gathered to rank 0 and saved there in Hugging Face format, as one learner saves it; each
    replica's optimizer shards through torch.distributed.checkpoint; the scheduler (the same on every replica)
    and the replica count in trainer_state.pt. Several nodes: `path` must be on a filesystem all of them see."""
    from transformers import AutoTokenizer

    from opd import data_parallel

    path, model = Path(path), student.model
    whole = data_parallel.full_state_dict(model)
    if rank == 0:
        tied = ({n for n, _ in model.named_parameters(remove_duplicate=False)} -
                {n for n, _ in model.named_parameters()})  # lm_head.weight when it is embed_tokens: saved once
        model.save_pretrained(path, state_dict={k: v for k, v in whole.items() if k not in tied})
        AutoTokenizer.from_pretrained(tokenizer_source).save_pretrained(path)
        torch.save({"optimizer": None, "scheduler": scheduler.state_dict(), "version": version, "rng": rng_state(),
                    "learner_replicas": replicas}, path / TRAINER_STATE)
    else:
        torch.save({"rng": rng_state()}, path / f"rng_rank{rank}.pt")
    data_parallel.save_optimizer(path, student, optimizer)


def _trainer_state(path: Path, replicas: int) -> dict:
    """trainer_state.pt, refused when another number of learner replicas wrote it (its optimizer state is laid
    out for that many)."""
    state = torch.load(Path(path) / TRAINER_STATE, map_location="cpu", weights_only=True)
    saved = state.get("learner_replicas", 1)
    if saved != replicas:
        raise ConfigError(f"checkpoint {path} was written by {saved} learner replica(s), this run has {replicas}: "
                          f"resume with run.learner_replicas={saved} (the optimizer state is sharded {saved} way(s); "
                          f"resharding it is not supported)")
    return state


def _read_weights(path: Path, model) -> dict[str, torch.Tensor]:
    """The student's weights in checkpoint `path`, checked against `model`'s names (tied ones may be absent)."""
    from safetensors.torch import load_file

    saved = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        saved.update(load_file(f))
    live = model.state_dict(keep_vars=True)  # every name, tied ones included (lm_head.weight = embed_tokens)
    unknown = sorted(set(saved) - set(live))
    if unknown:
        raise ValueError(f"checkpoint {path} holds {unknown[:3]}, which the student does not have: another model")
    primary = {n for n, _ in model.named_parameters()}  # a tied parameter under its first name
    missing = sorted(primary - set(saved))
    if missing:
        raise ValueError(f"checkpoint {path} lacks {missing[:3]}: another model")
    return saved


@torch.no_grad()
def load_learner(path: Path, model, optimizer, scheduler) -> int:
    """Restore `save_learner`'s state into live objects; returns the policy version.

    The weights are copied *into* the existing parameters: in cpu mode they are views of the shared buffer
    the rollout engine maps, and replacing the tensors would cut the engine off."""
    path = Path(path)
    state = _trainer_state(path, 1)
    live = model.state_dict(keep_vars=True)
    for name, value in _read_weights(path, model).items():
        live[name].copy_(value)
    optimizer.load_state_dict(state["optimizer"])  # moves its tensors to the parameters' device
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return int(state["version"])


def load_sharded(path: Path, student, optimizer, scheduler, *, rank: int, replicas: int) -> int:
    """Restore `save_sharded`'s state on every replica (collectives): each reads the whole weights and keeps its
    shards, and its optimizer shards; returns the policy version."""
    from opd import data_parallel

    path = Path(path)
    state = _trainer_state(path, replicas)
    data_parallel.load_full_state_dict(student.model, _read_weights(path, student.model))
    data_parallel.load_optimizer(path, student, optimizer)
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"] if rank == 0 else
                  torch.load(path / f"rng_rank{rank}.pt", map_location="cpu", weights_only=True)["rng"])
    return int(state["version"])


def rng_state() -> dict:
    """Every global generator a learner step could draw from (dropout, samplers), as plain values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": random.getstate(),
            "numpy": [kind, keys.tolist(), pos, has_gauss, cached]}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


# ---------------------------------------------------------------- the run's config


def load_run_config(run_dir: str) -> Config:
    """The resolved config a run directory was started with, pointed at that directory for a resume."""
    path = Path(run_dir).expanduser().resolve()
    try:
        saved = json.loads((path / "config.json").read_text())
    except FileNotFoundError:
        raise ConfigError(f"--resume {run_dir}: no run directory there ({path / 'config.json'} is missing); give "
                          f"the folder a run printed as its run directory") from None
    except ValueError:
        raise ConfigError(f"--resume {run_dir}: {path / 'config.json'} is not valid JSON") from None
    cfg = config_from_dict(saved, where=str(path / "config.json"))
    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, resume=str(path), out_dir=str(path.parent),
                                                            name=path.name))


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def check_compatible(saved: dict, cfg: Config, checkpoint: Path) -> None:
    """Refuse to continue a checkpoint under a config that changes the run (another model, loss, lr, data, ...)."""
    before = _flat(saved)
    now = _flat(json.loads(json.dumps(cfg.to_dict())))  # tuples as lists, as they were saved
    changed = [k for k in now if k in before and k not in RESUMABLE and now[k] != before[k]]
    if changed:
        k = changed[0]
        raise ConfigError(f"checkpoint {checkpoint} was written with {k}={before[k]!r}, this run has {now[k]!r}"
                          f"{f' (and {len(changed) - 1} more)' if len(changed) > 1 else ''}: resume with the run's "
                          f"own settings (only {', '.join(sorted(RESUMABLE - {'run.resume'}))} may change)")
    steps = before.get("train.steps")
    if steps is not None and steps != cfg.train.steps and cfg.learner.lr_schedule != "constant":
        print(f"warning: train.steps changed from {steps} to {cfg.train.steps}: the {cfg.learner.lr_schedule} "
              f"learning-rate schedule follows the new length from the checkpoint on", file=sys.stderr)
