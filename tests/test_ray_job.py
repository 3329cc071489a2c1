"""docs/ray_cluster.md's "On a Ray cluster" commands, run as a user types them after the README's set-up: a token,
a local `ray start --head`, `ray job submit` of the default run with the virtual environment's Python.

Only what the test adds to the page's lines: `--block` on `ray start` (the head then stays in this test's own
process group, which the test stops by signalling that group: only what it started is stopped; `ray stop` would
stop every Ray of the user), and `--set` overrides after the page's submit command (2 steps, the run
directory in a temporary folder; later `--set`s win). PATH is the machine's, HOME a temporary folder (the token
goes there; a token another Ray left in ~/.ray must not decide the outcome), and so is RAY_TMPDIR (the head's
session and the address file `ray start` leaves, which later tests' `ray.init()` would otherwise try to join). The job agent may answer "No
available agent to submit job" for a while after the head starts (and find no Ray before that): the submission
is repeated on those answers alone, within a bound (nothing was started), as the page says.
"""

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

AGENT_NOT_READY = "No available agent to submit job"
# what a submission says while the head is still starting; nothing was submitted, so it is repeated
NOT_UP_YET = (AGENT_NOT_READY, "Could not find any running Ray instance", "Failed to connect", "Connection refused")


def readme_block(root, page: str, heading: str) -> list[str]:
    text = (root / page).read_text()
    section = text[text.index(heading):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line.split("  #")[0].strip() for line in block.strip().splitlines()]


@pytest.mark.slow
def test_readme_ray_job_commands_run_the_default(root, tmp_path):
    token, start, submit = readme_block(root, "docs/ray_cluster.md", "# On a Ray cluster")
    assert start.startswith("RAY_AUTH_MODE=token ") and "ray start --head" in start
    assert "$PWD/.venv/bin/python driver.py" in submit
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "VIRTUAL_ENV"))}
    # RAY_TMPDIR: the head's session and its address file (ray_current_cluster, which a later address-less
    # ray.init() would join) stay in a folder of this test's; short, as Ray's socket paths must stay < 108 bytes
    ray_tmp = tempfile.mkdtemp(prefix="opd-ray-", dir="/tmp")
    env.update(HOME=str(home), RAY_USAGE_STATS_ENABLED="0", RAY_TMPDIR=ray_tmp)

    def shell(command, **kw):
        return subprocess.run(["bash", "-c", command], cwd=root, env=env, capture_output=True, text=True, **kw)

    made = shell(token, timeout=120)
    assert made.returncode == 0 and (home / ".ray" / "auth_token").is_file(), made.stderr
    head = subprocess.Popen(["bash", "-c", f"{start} --block"], cwd=root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    out_dir = tmp_path / "runs"
    try:
        command = (f"{submit} --set train.steps=2 --set train.prompts_per_step=8 --set data.num_eval_prompts=16 "
                   f"--set run.out_dir={out_dir} --set run.name=job --set run.progress=false")
        deadline = time.monotonic() + 240
        while True:  # the head starting (connection refused), then its job agent (AGENT_NOT_READY): bounded
            job = shell(command, timeout=900)
            log = job.stdout + job.stderr
            if job.returncode == 0 or time.monotonic() > deadline:
                break
            assert head.poll() is None, head.stdout.read()
            if not any(m in log for m in NOT_UP_YET):
                break
            time.sleep(2)
        assert job.returncode == 0, log[-4000:]
        assert "succeeded" in log and f"run directory: {out_dir / 'job'}" in log, log[-4000:]
        assert (out_dir / "job" / "checkpoints" / "step_2" / "config.json").is_file()  # the final checkpoint
        assert (out_dir / "job" / "report.html").is_file()
        assert (Path(ray_tmp) / "ray" / "ray_current_cluster").is_file()  # the head's address file is ours
        # token auth was on: a client without the token is turned away
        refused = subprocess.run(["bash", "-c", ".venv/bin/ray job list"], cwd=root, capture_output=True, text=True,
                                 env={**env, "HOME": str(tmp_path)}, timeout=120)  # no token here
        assert refused.returncode != 0, refused.stdout
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
