"""The `qsbr` command line: `qsbr demo` and `qsbr bench`."""

from __future__ import annotations

import argparse
import os
import runpy
import sys
import tempfile
from pathlib import Path


def _benchmarks_dir(explicit: str | None) -> Path:
    if explicit:
        return Path(explicit)
    candidates = [Path.cwd() / "benchmarks", Path(__file__).resolve().parents[2] / "benchmarks"]
    for c in candidates:
        if (c / "bench_core.py").exists():
            return c
    raise SystemExit(
        "qsbr bench: no benchmarks/ folder found; run it from a checkout of qsbr "
        "or pass --dir PATH/TO/benchmarks"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qsbr", description="Quiescent-State Based Reclamation for Python")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="a hot-swap under load, verified")
    demo.add_argument("--seconds", type=float, default=10.0, help="how long to run (default 10)")
    demo.add_argument("--readers", type=int, default=4, help="reader threads (default 4)")
    demo.add_argument("--swap-ms", type=float, default=1.0, help="milliseconds between swaps (default 1)")
    demo.add_argument(
        "--no-reclaimer",
        action="store_true",
        help="let the writer's retire() run releases instead of a background reclaimer",
    )
    demo.add_argument(
        "--stall",
        action="store_true",
        help="one reader stops quiescing for a while: watch it being named and the backlog held under a cap",
    )
    demo.add_argument(
        "--processes",
        type=int,
        default=0,
        help="the across-processes demo instead: N reader processes and a writer share a SharedCell; "
        "one reader is SIGKILLed mid-run",
    )
    view = demo.add_mutually_exclusive_group()
    view.add_argument("--live", dest="live", action="store_true", default=None, help="live view (needs rich)")
    view.add_argument("--plain", dest="live", action="store_false", help="one plain line per second")

    bench = sub.add_parser("bench", help="run the benchmarks in benchmarks/ and write JSON results")
    bench.add_argument("names", nargs="*", help="benchmarks to run (bench_NAME.py), default all")
    bench.add_argument("--dir", help="the benchmarks folder (default: ./benchmarks)")
    bench.add_argument("--quick", action="store_true", help="fewer repetitions, for a smoke test")
    bench.add_argument(
        "--out",
        help="folder for the JSON results (default: benchmarks/results; a temporary folder with --quick)",
    )

    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo

        if args.seconds <= 0 or args.readers < 1 or args.swap_ms < 0 or args.processes < 0:
            parser.error("--seconds must be > 0, --readers >= 1, --swap-ms >= 0, --processes >= 1")
        if args.processes:
            from .demo_processes import run_process_demo

            if args.processes < 2:
                parser.error("--processes needs at least 2 reader processes (one of them is killed)")
            return 0 if run_process_demo(args.processes, args.seconds, live=args.live).ok else 1
        report = run_demo(
            seconds=args.seconds,
            readers=args.readers,
            swap_interval=args.swap_ms / 1000,
            background=not args.no_reclaimer,
            stall=args.stall,
            live=args.live,
        )
        return 0 if report.ok else 1
    if args.command == "bench":
        folder = _benchmarks_dir(args.dir)
        names = args.names or sorted(p.stem.removeprefix("bench_") for p in folder.glob("bench_*.py"))
        if args.quick:
            os.environ["QSBR_BENCH_QUICK"] = "1"
        out = args.out
        if args.quick and not out:
            # Quick figures are not results: never over the checkout's.
            out = tempfile.mkdtemp(prefix="qsbr-bench-quick-")
            print(f"quick run: results go to {out} (pass --out to choose)", flush=True)
        if out:
            os.environ["QSBR_BENCH_OUT"] = str(Path(out).resolve())
        for name in names:
            path = folder / f"bench_{name}.py"
            if not path.exists():
                parser.error(f"no benchmark {path}")
            print(f"== {path}", flush=True)
            sys.argv = [str(path)]
            runpy.run_path(str(path), run_name="__main__")
        return 0
    return 2  # pragma: no cover - argparse requires a command


if __name__ == "__main__":
    sys.exit(main())
