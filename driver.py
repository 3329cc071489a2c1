"""On-policy distillation from a checkout: `python driver.py [options]` (the same as `opd train [options]`).

    python driver.py                                  # the embedded default (preset tiny_cpu)
    python driver.py --preset tiny_cpu --set loss.kind=jsd --set train.steps=200
    python driver.py --config configs/smollm2_cpu.yaml    # settings from a YAML / JSON file (over the preset)
    python driver.py --resume runs/<name>                 # continue a run from its latest checkpoint
    ray job submit --working-dir . -- $PWD/.venv/bin/python driver.py --set run.out_dir=$PWD/runs

A script at the project's root, not an installed module: the loop (rollout -> teacher score -> learner step ->
weight sync) is `opd/programs/train.py`, inside the one package the project installs, so that the `opd` command
runs it from anywhere and nothing but `opd` is put on a user's import path.
"""

import sys

from opd.programs.train import main

if __name__ == "__main__":
    sys.exit(main())
