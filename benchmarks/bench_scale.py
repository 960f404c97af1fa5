"""rd_seq at scale: poll() and synchronize() latency against attached threads.

Two scenarios, each at 10 to 10,000 registered threads:

* "rounds": the threads quiesce when the benchmark starts a round, as
  readers between requests would; polls are timed while they are parked,
  with the garbage collector paused (the scan's own cost).
* "stuck": the threads never quiesce; an unregistered poller calls advance()
  then poll(goal), which fails, 2,000 times, timed as a pair, with the
  garbage collector ON, as every program runs. This is where an allocation
  on the advance or poll path shows: each collection it triggers walks the
  whole heap on free-threaded 3.13 (10,000 threads make that heap big).

For each strategy (the design's "flat" scan and our "incremental" one) and
each thread count (10, 100, 1,000, 10,000), N real threads register and stay
attached, parked; they report a quiescent state only when the benchmark starts
a "round" (every ROUND_EVERY polls), as readers between requests would. A
registered writer reports its own quiescent state and polls; we time each
poll() (median and p99): the rd_seq computation. Nothing is pending, so no
release runs inside the timed polls (bench_core measures releases). Then we time synchronize() from
a helper thread, with a round started as soon as the grace period begins: that
is the time for N threads to wake and pass a quiescent state, plus the scans.
Polls are timed only while the parked threads are idle (each round is waited
for), so the poll figures are the scan's cost, not the wake-up of N threads.

Results: benchmarks/results/scale-<build>.json; the plot (matplotlib, the
`plot` extra) is drawn by benchmarks/plot_scale.py from every build's JSON.

Run:  qsbr bench scale     (QSBR_BENCH_QUICK=1 for a smoke run)
"""

from __future__ import annotations

import gc
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import qsbr
from _common import QUICK, machine, write_json

COUNTS = [10, 100, 1000] if QUICK else [10, 100, 1000, 10_000]
if os.environ.get("QSBR_SCALE_COUNTS"):  # e.g. "10,10000"
    COUNTS = [int(x) for x in os.environ["QSBR_SCALE_COUNTS"].split(",")]
POLLS = 500 if QUICK else 5000
ROUND_EVERY = 500  # rounds are rare: the first poll after one runs cold
SYNCS = 3 if QUICK else 7
STRATEGIES = ["flat", "incremental"]


class Parked:
    """n attached threads that quiesce once per round."""

    def __init__(self, domain: qsbr.Domain, n: int) -> None:
        self.domain = domain
        self.cond = threading.Condition()
        self.n = n
        self.round = 0
        self.acks = 0
        self.round_done = threading.Event()
        self.stop = False
        self.ready = threading.Barrier(n + 1, timeout=300)
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(n)]
        for t in self.threads:
            t.start()
        self.ready.wait()

    def _run(self) -> None:
        d = self.domain
        d.register()
        seen = 0
        self.ready.wait()
        with self.cond:
            while True:
                self.cond.wait_for(lambda seen=seen: self.round != seen or self.stop)
                if self.stop:
                    break
                seen = self.round
                d.quiescent()
                self.acks -= 1  # under self.cond
                if self.acks == 0:
                    self.round_done.set()
        d.unregister()

    def start_round(self) -> None:
        with self.cond:
            self.round_done.clear()
            self.acks = self.n
            self.round += 1
            self.cond.notify_all()

    def wait_round(self) -> None:
        if not self.round_done.wait(timeout=300):
            raise RuntimeError("parked threads did not finish their round")
        # The last acknowledgements arrive before every thread is blocked
        # again; give them time to park, so they do not compete with the
        # polls we time.
        time.sleep(0.02 + self.n * 2e-6)

    def close(self) -> None:
        with self.cond:
            self.stop = True
            self.cond.notify_all()
        for t in self.threads:
            t.join(timeout=60)


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def measure(strategy: str, n: int) -> dict[str, Any]:
    d = qsbr.Domain(scan=strategy)
    parked = Parked(d, n)
    d.register()
    polls: list[float] = []
    grace_before = d.stats().grace_periods
    perf = time.perf_counter
    gc.disable()  # the collector's pauses are not what we measure
    try:
        for i in range(POLLS):
            if i % ROUND_EVERY == 0:
                # The readers pass a quiescent state; we time polls only once
                # they are parked again, so that what we measure is the scan,
                # not the wake-up of n threads (synchronize() below has that).
                parked.start_round()
                parked.wait_round()
            d.quiescent()
            t0 = perf()
            d.poll()
            polls.append(perf() - t0)
    finally:
        gc.enable()

    syncs: list[float] = []
    for _ in range(SYNCS):
        result: list[float] = []

        def syncer(result: list[float] = result) -> None:
            t0 = perf()
            ok = d.synchronize(timeout=120)
            result.append(perf() - t0 if ok else float("nan"))

        w0 = d.wr_seq
        t = threading.Thread(target=syncer)
        with d.detached():  # the writer waits for the syncer: hold nobody back
            t.start()
            while d.wr_seq == w0:  # the grace period has begun
                time.sleep(0)
            parked.start_round()
            t.join(timeout=180)
            parked.wait_round()
        syncs.append(result[0] if result else float("nan"))
    grace_periods = d.stats().grace_periods - grace_before
    d.unregister()
    parked.close()
    d.close()
    return {
        "strategy": strategy,
        "threads": n,
        "poll_median_us": statistics.median(polls) * 1e6,
        "poll_p99_us": pct(polls, 0.99) * 1e6,
        "poll_max_us": max(polls) * 1e6,
        "sync_median_ms": statistics.median(syncs) * 1e3,
        "sync_max_ms": max(syncs) * 1e3,
        "polls": len(polls),
        "grace_periods": grace_periods,
    }


STUCK_POLLS = 500 if QUICK else 2000


def measure_stuck(strategy: str, n: int) -> dict[str, Any]:
    """advance() + a failing poll(goal), with n attached threads that never
    quiesce, the garbage collector on."""
    d = qsbr.Domain(scan=strategy)
    parked = Parked(d, n)  # registered and attached; no round is ever started
    times: list[float] = []
    perf = time.perf_counter
    gc.collect()  # every row starts from the same collector state
    gen0_before = gc.get_count()[0]
    collections_before = sum(g["collections"] for g in gc.get_stats())
    for _ in range(STUCK_POLLS):
        t0 = perf()
        goal = d.advance()
        d.poll(goal)
        times.append(perf() - t0)
    collections = sum(g["collections"] for g in gc.get_stats()) - collections_before
    gen0_after = gc.get_count()[0]
    assert not d.goal_reached(d.wr_seq)  # every poll failed
    parked.close()
    d.close()
    return {
        "strategy": strategy,
        "threads": n,
        "median_us": statistics.median(times) * 1e6,
        "p99_us": pct(times, 0.99) * 1e6,
        "max_us": max(times) * 1e6,
        "gc_collections": collections,
        "gc_gen0_growth": gen0_after - gen0_before,
        "polls": len(times),
    }


def main() -> None:
    threading.stack_size(256 * 1024)  # 10,000 threads: keep their stacks small
    rows = []
    mach = machine()
    print(f"python {mach['python']} ({mach['build']}), {mach['cpus']} cpus")
    print(f"  {'strategy':<12}{'threads':>8}{'poll med us':>13}{'poll p99 us':>13}{'sync med ms':>13}")
    for n in COUNTS:
        for strategy in STRATEGIES:
            r = measure(strategy, n)
            rows.append(r)
            print(
                f"  {strategy:<12}{n:>8}{r['poll_median_us']:>13.1f}{r['poll_p99_us']:>13.1f}"
                f"{r['sync_median_ms']:>13.2f}",
                flush=True,
            )
    by = {(r["strategy"], r["threads"]): r for r in rows}
    ratios = {s: by[(s, COUNTS[-1])]["poll_p99_us"] / by[(s, COUNTS[0])]["poll_p99_us"] for s in STRATEGIES}
    for s, ratio in ratios.items():
        print(
            f"  {s}: poll p99 at {COUNTS[-1]:,} threads / at {COUNTS[0]} threads"
            f" = {ratio:.2f}x (target <= 3x)"
        )
    print("stuck readers, collector on: advance() + failing poll(goal)")
    print(f"  {'strategy':<12}{'threads':>8}{'median us':>11}{'p99 us':>9}{'max us':>10}{'collections':>13}")
    stuck = []
    for n in (COUNTS[0], COUNTS[-1]):
        for strategy in STRATEGIES:
            r = measure_stuck(strategy, n)
            stuck.append(r)
            print(
                f"  {strategy:<12}{n:>8}{r['median_us']:>11.2f}{r['p99_us']:>9.2f}{r['max_us']:>10.0f}"
                f"{r['gc_collections']:>13}",
                flush=True,
            )
    sby = {(r["strategy"], r["threads"]): r for r in stuck}
    stuck_ratios = {
        s: {
            "p99": sby[(s, COUNTS[-1])]["p99_us"] / sby[(s, COUNTS[0])]["p99_us"],
            "median": sby[(s, COUNTS[-1])]["median_us"] / sby[(s, COUNTS[0])]["median_us"],
        }
        for s in STRATEGIES
    }
    for s, q in stuck_ratios.items():
        print(
            f"  {s}: at {COUNTS[-1]:,} threads / at {COUNTS[0]}: p99 {q['p99']:.2f}x (target <= 3x),"
            f" median {q['median']:.2f}x"
        )
    path = write_json(
        "scale",
        {
            "rows": rows,
            "p99_ratio_max_vs_min_threads": ratios,
            "polls": POLLS,
            "round_every": ROUND_EVERY,
            "stuck_rows": stuck,
            "stuck_ratio_max_vs_min_threads": stuck_ratios,
            "stuck_polls": STUCK_POLLS,
        },
    )
    print(f"  wrote {path}")
    try:
        import plot_scale

        png = plot_scale.plot(path.parent)
        print(f"  plotted {png}")
    except ImportError as exc:
        print(f"  no plot ({exc.name} is not installed here; run benchmarks/plot_scale.py where it is)")


if __name__ == "__main__":
    main()
