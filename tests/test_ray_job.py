"""`ray job submit --working-dir . -- python driver.py` against a local `ray start --head`, as the README says.

The Ray head is started by this test with `--block` in its own process group and stopped by signalling that
group, so only what the test started is stopped. HOME is a temporary folder: a token another Ray left in
~/.ray/auth_token must not decide the outcome, and the run itself must not write one.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ray_job_submit_runs_the_default(root, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(home), PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}",
               RAY_USAGE_STATS_ENABLED="0")
    ray_tmp = tempfile.mkdtemp(prefix="opd-ray-", dir="/tmp")  # Ray's socket paths must stay < 108 bytes
    gcs_port, dashboard_port = _free_port(), _free_port()
    address = f"http://127.0.0.1:{dashboard_port}"
    head = subprocess.Popen(
        [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", f"--port={gcs_port}",
         f"--dashboard-port={dashboard_port}", "--dashboard-host=127.0.0.1", "--num-cpus=2",
         "--include-dashboard=true", f"--temp-dir={ray_tmp}"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.time() + 120
        while True:
            ready = subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "job", "list", "--address", address],
                                   env=env, capture_output=True, text=True)
            if ready.returncode == 0:
                break
            assert head.poll() is None, head.stdout.read()
            assert time.time() < deadline, ready.stderr
            time.sleep(2)
        out_dir = tmp_path / "runs"
        job = subprocess.run(
            [sys.executable, "-m", "ray.scripts.scripts", "job", "submit", "--address", address, "--working-dir",
             str(root), "--", "python", "driver.py", "--set", "train.steps=2", "--set", "train.prompts_per_step=8",
             "--set", "data.num_eval_prompts=16", "--set", f"run.out_dir={out_dir}", "--set", "run.name=job",
             "--set", "run.progress=false"],
            env=env, capture_output=True, text=True, timeout=600)
        log = job.stdout + job.stderr
        assert job.returncode == 0, log[-4000:]
        assert "succeeded" in log and f"run directory: {out_dir / 'job'}" in log, log[-4000:]
        assert (out_dir / "job" / "checkpoints" / "step_2" / "config.json").is_file()  # the final checkpoint
        assert not (home / ".ray" / "auth_token").exists()
    finally:
        _stop_group(head)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _stop_group(head: subprocess.Popen) -> None:
    """SIGTERM the head's process group (ray start --block stops its node on it), SIGKILL what is left."""
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 0)):
        try:
            os.killpg(head.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.time() + wait
        while time.time() < deadline:
            try:
                os.killpg(head.pid, 0)  # anything of the group still alive?
            except ProcessLookupError:
                return
            time.sleep(0.5)
    head.wait()
