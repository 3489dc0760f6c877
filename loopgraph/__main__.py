"""``loopgraph`` command line: ``loopgraph bench`` (the default) measures denoising throughput; ``loopgraph cache``
lists or clears the persistent cache of compiled loops."""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _model_override(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. hidden_dim=128), got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def _parser() -> argparse.ArgumentParser:
    from .bench.methods import METHODS

    parser = argparse.ArgumentParser(prog="loopgraph", description=__doc__)
    commands = parser.add_subparsers(dest="command")
    bench = commands.add_parser(
        "bench", help="time eager vs compile_denoiser vs compile_loop on one loop (the default command)",
        description="Runs every method on identical inputs, checks each against eager, then times them "
                    "interleaved. Writes bench.json, bench.csv and bench.png into --out.")
    bench.add_argument("--loop", metavar="MODULE:FUNCTION",
                       help="benchmark your own loop: a function returning (wrapper, components, make_state[, output "
                            "name]); make_state(steps) makes a fresh state (instead of --preset). MODULE is imported "
                            "from the current directory (as python -m does) or is a file, path/to/loop.py:FUNCTION")
    bench.add_argument("--denoiser", metavar="NAME",
                       help="the components attribute that is the denoiser model, which compile_denoiser compiles and "
                            "the floor times alone (default: denoiser, unet or transformer)")
    bench.add_argument("--preset", default="dit",
                       help="zoo preset (dit, dit-ddim, unet, unet-ddim), a diffusers loop (sdxl, flux, wan, "
                            "qwenimage) or a diffusers family's core denoise step (stable_diffusion_3, flux2, ltx, "
                            "z_image, ...: loopgraph.zoo.diffusers_families.FAMILIES); these need "
                            "loopgraph[diffusers]; "
                            "default: dit")
    bench.add_argument("--steps", type=int, help="denoising steps N (default 20; --quick: 4)")
    bench.add_argument("--batch", type=int, help="batch size (default 1)")
    bench.add_argument("--resolution", type=int, dest="sample_size", help="latent height = width")
    bench.add_argument("--model", type=_model_override, action="append", default=[], metavar="KEY=VALUE",
                       help="denoiser config override, repeatable (e.g. --model hidden_dim=256 --model depth=4)")
    bench.add_argument("--dtype", choices=["float32", "float16", "bfloat16"])
    bench.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: CUDA when available, else CPU)")
    bench.add_argument("--repeats", type=int, help="timed calls per method (default 30; --quick: 3)")
    bench.add_argument("--methods", type=lambda s: tuple(m for m in s.split(",") if m),
                       help=f"comma-separated, from {','.join(METHODS)} (default: eager,compile_denoiser,compile_loop)")
    bench.add_argument("--scaling", type=_int_list, help="step counts of the scaling run (default 5,10,20,50)")
    bench.add_argument("--compile-timeout", type=float, help="seconds allowed for compile_wrapper's first call")
    bench.add_argument("--seed", type=int)
    bench.add_argument("--out", type=Path, help="output folder (default: bench-results/<timestamp>)")
    bench.add_argument("--quick", action="store_true", help="CI-sized run: 4 steps, 3 repeats")
    bench.add_argument("--cold-start", action="store_true",
                       help="also time each method's first result in fresh processes: a machine that never ran the "
                            "loop, then a restart (compile_loop loading from its persistent cache); minutes more")
    cache = commands.add_parser(
        "cache", help="list or clear the persistent cache of compiled loops",
        description="The compiled loops compile_loop stored ($LOOPGRAPH_CACHE_DIR, else the user cache directory): "
                    "each entry's key, size, last use and what it is.")
    cache.add_argument("action", choices=["list", "clear"], nargs="?", default="list")
    cache.add_argument("--dir", type=Path, help="the cache folder (default: where compile_loop keeps it)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv.insert(0, "bench")
    args = _parser().parse_args(argv)
    if args.command == "cache":
        return _cache(args)
    return _bench(args)


def _cache(args: argparse.Namespace) -> int:
    from .backend.disk_cache import CacheStore, cache_root, listing

    root = args.dir or cache_root(True)
    if root is None:
        print("the persistent cache is off (LOOPGRAPH_CACHE_DIR is set to an empty string); --dir names a folder")
        return 0
    store = CacheStore(root)
    if args.action == "clear":
        print(f"removed {store.clear()} entries from {root}")
        return 0
    entries = store.entries()
    for line in listing(entries):
        print(line)
    total = sum(e.bytes for e in entries)
    print(f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'}, {total / 2**20:.1f} MB in {root} "
          f"(bound {store.max_bytes / 2**20:.0f} MB: LOOPGRAPH_CACHE_MAX_MB)")
    return 0


def _bench(args: argparse.Namespace) -> int:
    try:
        from rich.console import Console
    except ImportError:
        print("loopgraph bench needs the bench extra (rich, matplotlib): pip install 'loopgraph[bench]' "
              "(`make run` installs it)", file=sys.stderr)
        return 2

    from .bench.loop import user_loop
    from .bench.report import LEGEND, default_out, findings, floor_line, render_table, write_report
    from .bench.run import run_bench

    try:
        config = _config(args)
        if config.loop is not None:
            user_loop(config.loop, config.steps)  # a module or function that is not there: said now, in one line
    except (TypeError, ValueError) as error:  # the messages do not name the command: it is said once, here
        print(f"loopgraph bench: {error}", file=sys.stderr)
        return 2
    console = Console()
    if not console.is_terminal:  # a log file or a pipe: do not squeeze the table into 80 columns
        console = Console(width=170)
    report = run_bench(config)
    console.print(render_table(report))
    console.print(LEGEND, highlight=False, soft_wrap=True)  # one line, however wide
    for rejected in report["rejected"]:  # markup=False: a reason may hold brackets ("modules: ['net']")
        console.print(f"not reported: {rejected['method']}: {rejected['reason']}", style="red", markup=False)
    for skipped in report["skipped"]:
        console.print(f"skipped: {skipped['method']}: {skipped['reason']}", style="yellow", markup=False)
    floor = report["floor"]
    console.print(floor_line(floor))
    for line in findings(report):
        console.print(line, markup=False, soft_wrap=True)
    for row in report["results"]:
        if row.get("batched_calls"):
            console.print(f"batched calls ({row['method']}): {row['batched_calls']}")
    if report.get("cold_start"):
        from .bench.cold_start import markdown_table as cold_table

        console.print("cold start (fresh processes; the second shares the first's caches):")
        console.print(cold_table(report["cold_start"]), markup=False)
    paths = write_report(report, args.out or default_out())
    console.print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def _config(args: argparse.Namespace):
    """The ``BenchConfig`` of ``loopgraph bench``'s arguments (``ValueError`` names a bad one)."""
    from .bench.loop import BenchConfig, with_overrides

    base = BenchConfig.quick() if args.quick else BenchConfig()
    config = with_overrides(
        base, preset=args.preset, loop=args.loop, steps=args.steps, batch=args.batch, sample_size=args.sample_size,
        dtype=args.dtype, device=args.device, repeats=args.repeats, methods=args.methods,
        scaling=args.scaling, compile_timeout=args.compile_timeout, seed=args.seed,
        model=dict(args.model) or None, cold_start=args.cold_start or None, denoiser=args.denoiser)
    if args.quick and args.scaling is None and args.steps is not None:
        config = with_overrides(config, scaling=(max(config.steps // 2, 1), config.steps))
    return config


if __name__ == "__main__":
    sys.exit(main())
