"""Diagnosis for docs/benchmarks.md ("What we know about the 3.13t miss"):
poll() cost with N parked attached threads for several incremental step sizes,
and plain allocate-and-free work with N parked threads, for comparison.

Run:  PYTHONPATH=src python benchmarks/diag_poll_step.py 10
      PYTHONPATH=src python benchmarks/diag_poll_step.py 10000
Not run by `qsbr bench` (that runs bench_*.py only).
"""

from __future__ import annotations

import gc
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_scale import Parked

import qsbr
from qsbr.scan import IncrementalScan


def timeit(f: Callable[[], Any], reps: int = 3000) -> tuple[float, float]:
    xs = []
    for _ in range(reps):
        t = time.perf_counter()
        f()
        xs.append(time.perf_counter() - t)
    xs.sort()
    return round(xs[len(xs) // 2] * 1e6, 2), round(xs[int(len(xs) * 0.99)] * 1e6, 2)


class Slotted:
    __slots__ = ("a", "b")


def alloc_work() -> int:
    objs = [Slotted() for _ in range(16)]
    table = {i: i for i in range(16)}
    return len(objs) + len(table)


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    threading.stack_size(256 * 1024)
    d = qsbr.Domain()
    parked = Parked(d, n)
    d.register()
    parked.start_round()
    parked.wait_round()
    gc.disable()
    print(f"python {sys.version.split()[0]}, {n} parked attached threads (median, p99 in us)")
    print("  alloc-and-free work", timeit(alloc_work))
    for step in (8, 12, 16):
        d._set_scanner(lambda registry, step=step: IncrementalScan(registry, step=step))
        d.quiescent()
        print(f"  poll, step {step:>2}", timeit(d.poll))
    gc.enable()
    d.unregister()
    parked.close()


if __name__ == "__main__":
    main()
