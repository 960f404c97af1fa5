"""Core costs, measured side by side in one run (docs/benchmarks.md).

1. The readers' only cost: Domain.quiescent() against an empty method call.
   Target: at most 2x. Also ThreadHandle.quiescent(), the per-thread form.
2. retire() plus its eventual release, amortized per object, against
   appending to a list and calling the release directly. Target: at most 5x.

Run:  qsbr bench core   (or: make bench; PYTHON=... for another interpreter)
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import qsbr  # noqa: E402
from _common import QUICK, interleaved, machine, write_json  # noqa: E402


class Plain:
    __slots__ = ("x",)

    def empty(self) -> None:
        pass


def noop_release(obj: object) -> None:
    pass


def main() -> None:
    d = qsbr.Domain()
    d.register()
    p = Plain()

    def empty_call(n: int) -> float:
        m = p.empty
        del m
        t = time.perf_counter()
        for _ in range(n):
            p.empty()
        return time.perf_counter() - t

    def quiescent(n: int) -> float:
        t = time.perf_counter()
        for _ in range(n):
            d.quiescent()
        return time.perf_counter() - t

    def empty_loop(n: int) -> float:
        t = time.perf_counter()
        for _ in range(n):
            pass
        return time.perf_counter() - t

    handle = d.handle()

    def handle_quiescent(n: int) -> float:
        h = handle
        t = time.perf_counter()
        for _ in range(n):
            h.quiescent()
        return time.perf_counter() - t

    n = 200_000 if QUICK else 2_000_000
    repeats = 3 if QUICK else 9
    reader = interleaved(
        {
            "loop": empty_loop,
            "empty_call": empty_call,
            "quiescent": quiescent,
            "handle_quiescent": handle_quiescent,
        },
        n,
        repeats,
    )

    objs = [object() for _ in range(100_000)]

    def append_and_release(n: int) -> float:
        lst: list[object] = []
        t = time.perf_counter()
        for o in objs[:n]:
            lst.append(o)
            noop_release(o)
        return time.perf_counter() - t

    def retire_case(domain: qsbr.Domain) -> Callable[[int], float]:
        def case(n: int) -> float:
            t = time.perf_counter()
            retire = domain.retire
            for o in objs[:n]:
                retire(o, noop_release)
            domain.barrier()
            return time.perf_counter() - t

        return case

    bg = qsbr.Domain(background=True)
    bg.register()
    retire_and_release = retire_case(d)
    retire_background = retire_case(bg)

    m = 20_000 if QUICK else 100_000
    writer = interleaved(
        {
            "append_and_release": append_and_release,
            "retire_and_release": retire_and_release,
            "retire_background_reclaimer": retire_background,
        },
        m,
        repeats,
    )
    bg.unregister()
    bg.close()
    d.unregister()
    d.close()

    # Ratios from the medians of the interleaved samples; loop overhead is
    # included on both sides of each ratio, as a caller's loop would be.
    q_ratio = reader["quiescent"]["median_ns"] / reader["empty_call"]["median_ns"]
    h_ratio = reader["handle_quiescent"]["median_ns"] / reader["empty_call"]["median_ns"]
    r_ratio = writer["retire_and_release"]["median_ns"] / writer["append_and_release"]["median_ns"]
    rb_ratio = writer["retire_background_reclaimer"]["median_ns"] / writer["append_and_release"]["median_ns"]
    results = {
        "reader": reader,
        "writer": writer,
        "ratios": {
            "quiescent_vs_empty_call": q_ratio,
            "handle_quiescent_vs_empty_call": h_ratio,
            "retire_release_vs_append_call": r_ratio,
            "retire_background_vs_append_call": rb_ratio,
        },
        "targets": {"quiescent_vs_empty_call": 2.0, "retire_release_vs_append_call": 5.0},
        "n": {"reader": n, "writer": m, "repeats": repeats},
    }
    path = write_json("core", results)
    mach = machine()
    print(f"python {mach['python']} ({mach['build']}), {mach['cpus']} cpus, {mach['platform']}")
    for group in (reader, writer):
        for name, r in group.items():
            print(f"  {name:<30} median {r['median_ns']:8.1f} ns/op   min {r['min_ns']:8.1f}")
    print(f"  quiescent / empty method call      {q_ratio:5.2f}x   (target <= 2x)")
    print(f"  ThreadHandle.quiescent / empty     {h_ratio:5.2f}x")
    print(f"  retire+release / append+call       {r_ratio:5.2f}x   (target <= 5x)")
    print(f"  same, background reclaimer         {rb_ratio:5.2f}x")
    print(f"  wrote {path}")


if __name__ == "__main__":
    main()
