"""Cold start on several loops: each method's first result in fresh processes (loopgraph.bench.cold_start), one preset
after another; writes cold_start.json and cold_start.md into the output folder.

    python benchmarks/cold_start_presets.py OUT [--presets dit,flux,wan,qwenimage,sdxl] [--steps 20]

The default loop's figures also come from ``loopgraph bench --cold-start``; this script is for the diffusers
presets, without the steady-state timing around them. Do not run anything else heavy meanwhile.
"""

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from loopgraph.bench.cold_start import COLD_METHODS, markdown_table, measure


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--presets", default="dit,flux,wan,qwenimage,sdxl")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--methods", default=",".join(COLD_METHODS))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for preset in args.presets.split(","):
        start = time.perf_counter()
        try:
            rows += measure(preset, args.steps, tuple(args.methods.split(",")),
                            progress=lambda what, p=preset: what and print(f"{p}: {what}", flush=True))
        except RuntimeError as e:  # one preset failing does not lose the others
            print(f"{preset}: {e}", file=sys.stderr, flush=True)
            rows.append({"preset": preset, "error": str(e)[-500:]})
        print(f"{preset}: {time.perf_counter() - start:.0f} s", flush=True)
        record = {"command": " ".join(["python", *sys.argv]), "cpu": platform.processor() or platform.machine(),
                  "torch": torch.__version__, "python": platform.python_version(), "steps": args.steps,
                  "rows": rows}
        (args.out / "cold_start.json").write_text(json.dumps(record, indent=1) + "\n")
        done = [r for r in rows if "method" in r]  # a preset that failed whole has no method
        (args.out / "cold_start.md").write_text("\n\n".join(
            f"### {p}\n\n" + markdown_table([r for r in done if r["preset"] == p])
            for p in dict.fromkeys(r["preset"] for r in done)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
