"""On-policy distillation from a checkout: `python driver.py [options]` (the same as `opd train [options]`).

    python driver.py                                  # the embedded default (preset tiny_cpu)
    python driver.py --preset tiny_cpu --set loss.kind=jsd --set train.steps=200
    python driver.py --config configs/smollm2_cpu.yaml    # settings from a YAML / JSON file (over the preset)
    python driver.py --resume runs/<name>                 # continue a run from its latest checkpoint
    ray job submit --working-dir . -- $PWD/.venv/bin/python driver.py --set run.out_dir=$PWD/runs

A script at the project's root, not an installed module: the loop is `opd/programs/train.py`, inside the one
package the project installs, so that the `opd` command runs it from anywhere and nothing but `opd` is put on a
user's import path. Each step of the loop is `opd/programs/step.py`'s `Step`, which the benchmark calls too:

    rollout   the student's engines sample the step's prompts (they hold the weights of the last sync)
    teacher   the teacher scores them, one part per learner micro-batch of the plan the batch carries
    learner   the chunked divergence, backward and optimizer step (run.overlap: the next rollout meanwhile)
    sync      the new weights reach the engines before the next rollout (opd/modes.py weight_route)
"""

import sys

from opd.programs.train import main

if __name__ == "__main__":
    sys.exit(main())
