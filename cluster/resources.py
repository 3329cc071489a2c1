"""What each mode needs from the machine; checked before Ray starts (this module does not import Ray)."""

from __future__ import annotations

from opd.config import Config, ConfigError

GPUS_NEEDED = {"cpu": 0, "colocated": 1, "split": 2}


def check_devices(cfg: Config) -> None:
    """Refuse a mode this machine cannot run, before Ray starts."""
    needed = GPUS_NEEDED[cfg.run.mode]
    if needed == 0:
        return
    import torch

    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if have < needed:
        raise ConfigError(f"run.mode={cfg.run.mode} needs {needed} GPU(s), this machine has {have}: "
                          f"use --mode cpu")
    raise ConfigError(f"run.mode={cfg.run.mode} is not available in this version yet: use --mode cpu")
