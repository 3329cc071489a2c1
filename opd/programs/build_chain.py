"""Build the running-sums teacher/student assets (opd/chain.py), with a fixed seed.

    python -m opd.programs.build_chain --out assets/chain [--seed 0] [--threads 2]

The study (opd/programs/study.py) builds them itself when they are missing.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from opd import chain


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build the running-sums teacher/student assets.")
    parser.add_argument("--out", type=Path, required=True, help="output directory, e.g. assets/chain")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    chain.build_assets(args.out, seed=args.seed)


if __name__ == "__main__":
    main()
