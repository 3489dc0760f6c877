"""``python -m loopgraph``: run the default zoo loop eagerly and report what it did."""

from __future__ import annotations

import argparse
import sys
import time

import torch


def main(argv: list[str] | None = None) -> int:
    from .zoo.loops import PRESETS, build_loop

    parser = argparse.ArgumentParser(prog="loopgraph", description=__doc__)
    parser.add_argument("--preset", default="dit", choices=sorted(PRESETS))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    setup = build_loop(args.preset, steps=args.steps)
    setup.run()  # warm-up
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        latents = setup.run()
        times.append(time.perf_counter() - start)
    times.sort()
    median = times[len(times) // 2]
    print(f"loopgraph {args.preset}: {PRESETS[args.preset].description}")
    print(f"  torch {torch.__version__}, device cpu, {args.steps} steps, batch 1, eager")
    print(f"  latents {tuple(latents.shape)} mean {latents.mean():+.4f} std {latents.std():.4f}")
    print(f"  median {median * 1e3:.1f} ms per loop ({median / args.steps * 1e3:.2f} ms per step, "
          f"{args.repeats} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
