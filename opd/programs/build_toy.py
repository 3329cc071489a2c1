"""Build the embedded toy teacher/student assets (opd/toy_assets.py), with a fixed seed.

    python -m opd.programs.build_toy --out assets/toy [--seed 0] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from opd.toy_assets import build_assets

logger = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build the embedded toy teacher/student assets.")
    parser.add_argument("--out", type=Path, required=True, help="output directory, e.g. assets/toy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is robust on a busy machine)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    build_assets(args.out, seed=args.seed)
    info = json.loads((args.out / "build_info.json").read_text())
    logger.info(
        "done in %.1f s: teacher %d steps, eval/accuracy %.3f; student %d steps, eval/accuracy %.3f",
        time.perf_counter() - t0,
        info["teacher"]["num_steps"],
        info["teacher"]["eval_accuracy"],
        info["student"]["num_steps"],
        info["student"]["eval_accuracy"],
    )


if __name__ == "__main__":
    main()
