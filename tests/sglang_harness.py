"""sglang's real `Engine` on a CPU, for the tests: started in a child process of its own, driven through a proxy.

The child sets what sglang's CPU engine needs (`SGLANG_USE_CPU_ENGINE=1`, the `sgl_kernel` stand-in of
tests/sglang_cpu first on the path) and builds `sglang.Engine(**server_args)` with the server arguments
`engine_kwargs(device="cpu")` gives; the proxy forwards each method call (`generate`, `update_weights_from_tensor`,
`flush_cache`, ...) over a pipe, so `SGLangEngine` drives it as it drives an engine in its own process. A child of
its own, because importing and starting sglang changes its process for good (multiprocessing's start method set
to spawn, signal handlers, environment variables): the pytest process stays as it was.

`unavailable()` says why sglang's engine cannot import here (None when it can). The real-engine tests skip on
that reason, except under CI (`CI=true`), where they fail: CI must run them.
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import traceback
from functools import cache
from pathlib import Path
from typing import Any

STAND_IN = Path(__file__).resolve().parent / "sglang_cpu"  # holds the sgl_kernel stand-in
START_TIMEOUT_S = 600  # engine start: 14-40 s here; a loaded machine is slower
CALL_TIMEOUT_S = 600


def cpu_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment sglang's CPU engine runs in: `env` (default os.environ) plus the stand-in and the switch."""
    env = dict(os.environ if env is None else env)
    env["SGLANG_USE_CPU_ENGINE"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(STAND_IN), *filter(None, [env.get("PYTHONPATH")])])
    return env


@cache
def unavailable() -> str | None:
    """Why sglang's engine does not import on this CPU (its import, in a fresh process), or None."""
    code = "import sgl_kernel, sglang.srt.entrypoints.engine; assert sgl_kernel.STAND_IN"
    out = subprocess.run([sys.executable, "-c", code], env=cpu_env(), capture_output=True, text=True, timeout=600)
    if out.returncode == 0:
        return None
    last = (out.stderr.strip().splitlines() or ["no output"])[-1]
    return f"sglang's engine does not import on this CPU: {last} (the test command installs it: README)"


def require_engine() -> None:
    """Skip the calling test when sglang cannot run here; under CI, fail instead (CI must run these tests)."""
    import pytest

    if (why := unavailable()) is None:
        return
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI must run the real-engine tests: {why}")
    pytest.skip(why)


def _serve(conn, server_args: dict[str, Any]) -> None:
    os.environ.update({k: v for k, v in cpu_env().items() if k in ("SGLANG_USE_CPU_ENGINE", "PYTHONPATH")})
    sys.path.insert(0, str(STAND_IN))
    import torch.multiprocessing

    # CPU tensors in a flattened bucket travel as shared-memory file names: file descriptors would need the
    # sender's resource sharer, which a process of another tree cannot reach
    torch.multiprocessing.set_sharing_strategy("file_system")
    try:
        import sglang

        engine = sglang.Engine(**server_args)
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        return
    conn.send(("ok", os.getpid()))
    while True:
        try:
            method, kwargs = conn.recv()
        except EOFError:  # the test process is gone: take sglang's processes down with this one
            engine.shutdown()
            return
        try:
            result = getattr(engine, method)(**kwargs)
            conn.send(("ok", result))
        except BaseException:
            conn.send(("error", traceback.format_exc()))
        if method == "shutdown":
            return


class EngineProcess:
    """`sglang.Engine(**server_args)` in a child process; attribute access gives its methods, called remotely."""

    def __init__(self, **server_args: Any):
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        # not a daemon: sglang starts processes of its own from it
        self.process = ctx.Process(target=_serve, args=(child, server_args))
        self.process.start()
        self.pid = self._reply("starting sglang.Engine", START_TIMEOUT_S)
        self.closed = False

    def _reply(self, what: str, timeout: float) -> Any:
        if not self._conn.poll(timeout):
            self.kill()
            raise TimeoutError(f"{what}: no answer from the engine process in {timeout:.0f} s")
        status, value = self._conn.recv()
        if status == "error":
            raise RuntimeError(f"{what} failed in the engine process:\n{value}")
        return value

    def __getattr__(self, method: str):
        if method.startswith("_"):
            raise AttributeError(method)

        def call(**kwargs: Any) -> Any:
            self._conn.send((method, kwargs))
            return self._reply(method, CALL_TIMEOUT_S)

        return call

    def shutdown(self) -> None:
        if not self.closed:
            self.closed = True
            self.__getattr__("shutdown")()
            self.process.join(60)

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
            self.process.join(30)
