"""Print the memory plan (opd/memory.py) of a config on a device; no model is loaded.

    python -m opd.programs.memory_plan --preset qwen25_1p5b_from_7b --gpu-gib 80 [--gpu-name H100] [--set a.b=v ...]

Without --gpu-gib it plans for this machine's GPUs (or its RAM in cpu mode). The exit status is 1 when the plan
does not fit, 2 for a config error.
"""

from __future__ import annotations

import argparse

from opd.config import ConfigError
from opd.memory import plan
from opd.memory_device import GIB, Device, detect
from opd.overrides import override
from opd.presets import preset


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Print the memory plan of a config on a device (no model is loaded).")
    ap.add_argument("--preset", default="tiny_cpu")
    ap.add_argument("--set", action="append", default=[], dest="sets", metavar="SECTION.FIELD=VALUE")
    ap.add_argument("--gpu-gib", type=float, default=0.0, help="plan for GPUs of this memory (0: this machine)")
    ap.add_argument("--gpu-name", default="GPU")
    ap.add_argument("--prompt-tokens", type=int, default=None,
                    help="the longest prompt (default: data.max_prompt_tokens)")
    args = ap.parse_args(argv)
    try:
        cfg = preset(args.preset)
        for s in args.sets:
            cfg = override(cfg, s)
        device = (Device.gpu(int(args.gpu_gib * GIB), args.gpu_name, 2) if args.gpu_gib
                  else detect(cfg) or Device.cpu())
        result = plan(cfg, device, prompt_tokens=args.prompt_tokens)
    except ConfigError as e:
        print(f"error: {e}")
        return 2
    print(result.format(verbose=True))
    for problem in result.problems:
        print(f"{'error' if device.kind == 'cuda' else 'warning'}: {problem}")
    return 1 if result.problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
