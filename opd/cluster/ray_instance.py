"""The Ray instance a run uses: a cluster it joins (run.ray_address, RAY_ADDRESS), or a private local one, kept
to this machine (loopback), with its own auth token, and the leftovers of a killed run's instance reclaimed."""

from __future__ import annotations

import logging
import os
import secrets
import sys
from pathlib import Path

import ray

from opd.config import PROJECT_ROOT, Config

OWNER_ENV = "OPD_RAY_OWNER"  # a private Ray instance's processes carry their driver's pid


def connect(cfg: Config) -> bool:
    """Join the cluster named by run.ray_address or RAY_ADDRESS (set by `ray job submit`), else start a
    private local instance; a Ray this process already joined (opd.study: one instance for all its runs) is
    kept. Returns whether this call started Ray (and so must shut it down)."""
    if ray.is_initialized():
        return False
    address = cfg.run.ray_address or os.environ.get("RAY_ADDRESS", "")
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
        return False
    # Ray >= 2.5x enables token auth for a local ray.init() and saves the token in ~/.ray/auth_token; a later
    # `ray start` then turns auth on and `ray job submit` fails with "Missing authentication token". Keep the
    # auth, but hand this private instance its token through the environment (inherited by Ray's own
    # processes) so nothing is written to disk. The token is never logged.
    if os.environ.get("RAY_AUTH_MODE", "token") == "token" and not os.environ.get("RAY_AUTH_TOKEN"):
        os.environ["RAY_AUTH_MODE"] = "token"
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
        _reload_ray_auth_config()
    _reclaim_orphans()
    os.environ[OWNER_ENV] = str(os.getpid())  # inherited by every process of the instance: see _reclaim_orphans
    _loopback_only()
    ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING,
             runtime_env={"env_vars": {"PYTHONPATH": worker_pythonpath()}})
    return True


def worker_pythonpath() -> str:
    """The project's root, then the driver's own PYTHONPATH (the actors see what the driver was given: the sglang
    stand-in of tests/sglang_cpu on a CPU, say)."""
    return os.pathsep.join([str(PROJECT_ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])


def _reclaim_orphans() -> None:
    """A driver killed with SIGKILL leaves Ray processes of its private instance behind (its dashboard and
    runtime-env agents stay, waiting on the dead GCS). They carry OWNER_ENV with the dead driver's pid: stop them.
    Only processes of this user whose owner is gone; a live run's, and anything not started by a driver, stay."""
    import signal

    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if proc.stat().st_uid != os.getuid():
                continue
            owner = next((v for v in (proc / "environ").read_bytes().split(b"\0")
                          if v.startswith(OWNER_ENV.encode() + b"=")), None)
            if owner is None or int(owner.partition(b"=")[2]) == os.getpid():
                continue
            try:
                os.kill(int(owner.partition(b"=")[2]), 0)
            except ProcessLookupError:  # the owner is dead: this is a leftover of its private instance
                os.kill(int(proc.name), signal.SIGKILL)
                print(f"note: stopped pid {proc.name}, left running by a run that was killed", file=sys.stderr)
        except (OSError, ValueError):  # gone meanwhile, or not readable
            continue


def _loopback_only() -> None:
    """Ray binds its servers to the node's IP, several on every interface; a private instance serves this machine
    alone, so make the node's IP the loopback: Ray's single-machine setting (its default on macOS and Windows),
    read by this process (cached at import) and by Ray's own. RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1 opts out."""
    from ray._private import ray_constants

    os.environ.setdefault(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR, "0")
    ray_constants.ENABLE_RAY_CLUSTER = ray_constants.env_bool(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR, True)


def _reload_ray_auth_config() -> None:
    """Ray caches its config (auth mode included) when it is first used in a process; make it read the
    environment again, as Ray itself does when it turns token auth on."""
    try:
        from ray._raylet import AuthenticationTokenLoader, Config as RayConfig
    except ImportError:  # a Ray without token auth: nothing cached to refresh
        return
    RayConfig.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()
