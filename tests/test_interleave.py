"""Systematic interleavings of the real Domain (see interleave.py).

Readers load a shared resource, use it across switch points and quiesce; a
writer swaps it, retires the old one and polls. A reader that uses a freed
resource fails its thread; every resource must be freed at most once during
the run and exactly once after it. The correct Domain survives random, PCT
and exhaustive (bounded) exploration; a Domain subclass that takes the goal
as the old wr_seq (the GOAL_OLD mutant of verify/qsbr.pml, in real code) is
caught by each strategy, and its failure replays from the seed and from the
recorded choices.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest

import qsbr
from helpers import Resource, Worker
from interleave import (
    PCTStrategy,
    RandomStrategy,
    Replay,
    SchedLock,
    Scheduler,
    exhaustive,
    explore,
    instrument,
)
from qsbr.scan import IncrementalScan

HERE = [__file__]
pytestmark = pytest.mark.timeout(300)


class GoalTakenEarly(qsbr.Domain):
    """Broken on purpose: tags a retirement with the wr_seq it read, not
    wr_seq + 2. A reader that loaded the resource before the unlink and
    has seq == that wr_seq then no longer holds the release back."""

    def _take_goal(self, counter: Any) -> int:
        return self._wr_seq  # the bug: must be self._wr_seq + 2 (or an advance)


def make_scenario(
    domain_class: type[qsbr.Domain], readers: int = 2, scan: str = "incremental", swaps: int = 2
) -> Callable[[Scheduler], dict[str, Callable[[], Any]]]:
    """Readers and one writer; checks run in the threads and after the run."""
    made: list[tuple[qsbr.Domain, list[Resource]]] = []

    def scenario(sched: Scheduler) -> dict[str, Callable[[], Any]]:
        d = domain_class(scan=scan, stall_timeout=None)
        instrument(d, sched)
        shared = [Resource(0)]
        every = [shared[0]]
        made.append((d, every))

        def reader() -> None:
            d.register()
            for _ in range(2):
                r = shared[0]
                r.use()
                r.use()  # still valid: no quiescent state since the load
                d.quiescent()
            d.detach()
            d.attach()
            r = shared[0]
            r.use()
            d.unregister()

        def writer() -> None:
            d.register()
            for k in range(1, swaps + 1):
                new = Resource(k)
                every.append(new)
                old, shared[0] = shared[0], new
                d.retire(old, Resource.release)
                d.poll()
                d.quiescent()
                d.poll()
            d.unregister()

        threads: dict[str, Callable[[], Any]] = {f"reader-{i}": reader for i in range(readers)}
        threads["writer"] = writer
        return threads

    scenario.made = made  # type: ignore[attr-defined]
    return scenario


def check_afterwards(scenario: Any) -> None:
    """After the last run: nothing is left pending once nobody is attached,
    and each retired resource was freed exactly once."""
    d, every = scenario.made[-1]
    d.poll()
    assert d.pending == 0
    assert [r.releases for r in every[:-1]] == [1] * (len(every) - 1)


# -- the correct Domain survives ------------------------------------------------


@pytest.mark.parametrize("scan", ["incremental", "flat"])
def test_correct_domain_survives_random_schedules(scan: str) -> None:
    scenario = make_scenario(qsbr.Domain, readers=2, scan=scan)
    runs, failure = explore(scenario, (RandomStrategy(seed) for seed in range(300)), HERE)
    assert failure is None, failure.describe()
    assert runs == 300
    check_afterwards(scenario)


@pytest.mark.parametrize("scan", ["incremental", "flat"])
def test_correct_domain_survives_pct_schedules(scan: str) -> None:
    scenario = make_scenario(qsbr.Domain, readers=2, scan=scan)
    strategies = (PCTStrategy(seed, depth=3, steps=800) for seed in range(300))
    runs, failure = explore(scenario, strategies, HERE)
    assert failure is None, failure.describe()
    check_afterwards(scenario)


def test_correct_domain_survives_every_schedule_with_one_preemption() -> None:
    # About 470 schedules; two preemptions would be about 100,000.
    scenario = make_scenario(qsbr.Domain, readers=1, swaps=1)
    runs, failure = exhaustive(scenario, preemption_bound=1, files=HERE)
    assert failure is None, failure.describe()
    assert runs > 100  # it really explored
    check_afterwards(scenario)


# -- the broken Domain is caught, and replays --------------------------------


#: Switch points for the broken-goal searches: the modules a retirement and a
#: poll run through. Lines of registration and thread-state setup would only
#: dilute the switches that matter (see tests/interleave.py, qsbr_modules).
CORE_MODULES = ("domain.py", "reclaim.py", "deferred.py", "scan.py")


def test_random_schedules_find_the_broken_goal_and_replay_it() -> None:
    scenario = make_scenario(GoalTakenEarly, readers=2)
    strategies = (RandomStrategy(seed) for seed in range(1000))
    runs, failure = explore(scenario, strategies, HERE, qsbr_modules=CORE_MODULES)
    assert failure is not None, f"{runs} random schedules missed the bug"
    assert any("used after it was released" in str(e) for e in failure.errors.values()), failure.describe()
    seed = int(failure.strategy.split("=")[1].rstrip(")"))
    # The seed alone reproduces the run: the same decisions, the same failure.
    s1 = Scheduler(RandomStrategy(seed), HERE, qsbr_modules=CORE_MODULES)
    out1 = s1.run(scenario(s1))
    assert out1.choices == failure.choices and out1.failed
    # ... and so do the recorded choices.
    s2 = Scheduler(Replay(failure.choices), HERE, qsbr_modules=CORE_MODULES)
    out2 = s2.run(scenario(s2))
    assert out2.failed and out2.choices == failure.choices
    first_line = {k: str(e).splitlines()[0] for k, e in failure.errors.items()}
    assert {k: str(e).splitlines()[0] for k, e in out2.errors.items()} == first_line


def test_pct_finds_the_broken_goal() -> None:
    scenario = make_scenario(GoalTakenEarly, readers=2)
    strategies = (PCTStrategy(seed, depth=3, steps=800) for seed in range(500))
    runs, failure = explore(scenario, strategies, HERE, qsbr_modules=CORE_MODULES)
    assert failure is not None, f"{runs} PCT schedules missed the bug"
    assert any("used after it was released" in str(e) for e in failure.errors.values())


def test_exhaustive_search_finds_the_broken_goal() -> None:
    scenario = make_scenario(GoalTakenEarly, readers=1, swaps=1)
    runs, failure = exhaustive(scenario, preemption_bound=1, files=HERE)
    assert failure is not None
    assert any("used after it was released" in str(e) for e in failure.errors.values())
    # The smallest failing schedules come first: replay the one it found.
    s = Scheduler(Replay(failure.choices), HERE)
    assert s.run(scenario(s)).failed


def test_the_same_seed_gives_the_same_schedule() -> None:
    scenario = make_scenario(qsbr.Domain, readers=2)
    s1, s2 = Scheduler(RandomStrategy(7), HERE), Scheduler(RandomStrategy(7), HERE)
    o1, o2 = s1.run(scenario(s1)), s2.run(scenario(s2))
    assert o1.choices == o2.choices and len(o1.choices) > 20
    s3 = Scheduler(RandomStrategy(8), HERE)
    assert s3.run(scenario(s3)).choices != o1.choices


# -- a real bug this project had: a pass not capped at its wr_seq -------------


_HUGE = 1 << 62


class UncappedScan(IncrementalScan):
    """Broken on purpose: a pass's minimum starts at "infinity" instead of
    the wr_seq read when the pass began (MUTANT_NO_CAP of verify/qsbr.pml).
    A thread that registers with an old wr_seq into a slot the pass has
    already passed is then overlooked (CHANGELOG: "Fixed")."""

    def scan(self, wr_seq: int, caller: Any, full: bool = False) -> tuple[int | None, bool]:
        if not self._lock.acquire(blocking=False):
            return None, False
        try:
            if not self._in_pass:
                self._in_pass = True
                self._cursor = 0
                self._lowest = _HUGE  # the bug: must be wr_seq
            slots = self.registry.slots
            start = self._cursor
            end = len(slots) if full else min(len(slots), start + self.step)
            lowest = self._lowest
            for i in range(start, end):
                st = slots[i]
                if st is not None and st.seq and st.seq < lowest:
                    lowest = st.seq
            if end < len(slots):
                self._cursor, self._lowest = end, lowest
                return None, False
            self._in_pass = False
            return (wr_seq if lowest == _HUGE else lowest), False
        finally:
            self._lock.release()


def late_reader_scenario(
    scan_class: type[IncrementalScan],
) -> Callable[[Scheduler], dict[str, Callable[[], Any]]]:
    """An unregistered poller scans one slot per poll; a writer swaps and
    retires; a reader registers late, into a free slot at a lower index than
    the writer's, and holds the old resource through a long read."""

    def scenario(sched: Scheduler) -> dict[str, Callable[[], Any]]:
        d = qsbr.Domain(stall_timeout=None, deferred_limit=1)  # retire() advances at once
        # Free slots 0 and 1, handed out 1 first: the writer gets 1, the
        # late reader 0 (the slot a pass scans first).
        h0, h1 = Worker("h0"), Worker("h1")
        h0.call(d.register)
        h1.call(d.register)
        h0.call(d.unregister)
        h1.call(d.unregister)
        h0.stop()
        h1.stop()
        d._set_scanner(lambda registry: scan_class(registry, step=1))
        instrument(d, sched)
        shared = [Resource(0)]

        def poller() -> None:
            for _ in range(4):
                d.poll()

        def late_reader() -> None:
            d.register()
            r = shared[0]
            for _ in range(20):
                r.use()  # a long read-side section
            d.quiescent()
            d.unregister()

        def writer() -> None:
            d.register()
            old, shared[0] = shared[0], Resource(1)
            d.retire(old, Resource.release)
            for _ in range(20):
                d.quiescent()  # a busy thread that quiesces often
            d.unregister()

        return {"poller": poller, "late": late_reader, "writer": writer}

    return scenario


def _pct(n: int) -> Any:
    # steps: about the length of one run with switch points in SCAN_MODULES.
    return (PCTStrategy(seed, depth=5, steps=200) for seed in range(n))


#: Switch points for the scan scenario: the pass (scan.py) and the slots a
#: late reader registers into (registry.py).
SCAN_MODULES = ("scan.py", "registry.py")


def test_pct_finds_the_uncapped_scan_and_the_real_scan_survives() -> None:
    # Switch points only in the scan, the registry and the scenario: the bug
    # needs five well-placed switches, and fewer points make them likelier.
    buggy = late_reader_scenario(UncappedScan)
    runs, failure = explore(buggy, _pct(500), HERE, qsbr_modules=SCAN_MODULES)
    assert failure is not None, f"{runs} PCT schedules missed the uncapped scan"
    assert "used after it was released" in str(failure.errors.get("late")), failure.describe()
    s = Scheduler(Replay(failure.choices), HERE, qsbr_modules=SCAN_MODULES)
    assert s.run(buggy(s)).failed  # and it replays
    real = late_reader_scenario(IncrementalScan)
    runs, failure = explore(real, _pct(500), HERE, qsbr_modules=SCAN_MODULES)
    assert failure is None, failure.describe()
    runs, failure = explore(real, (RandomStrategy(seed) for seed in range(300)), HERE)
    assert failure is None, failure.describe()


def test_unknown_module_is_refused() -> None:
    with pytest.raises(ValueError, match="no qsbr module"):
        Scheduler(RandomStrategy(0), qsbr_modules=("nope.py",))


# -- a structure: Cell's writers ------------------------------------------------


class UnlockedCell(qsbr.Cell[Any]):
    """Broken on purpose: set() swaps without the writers' lock, so two
    writers can both take the same old value and both retire it."""

    def _swap(self, new: Any, retiring: bool) -> tuple[Any, int | None]:
        old = self.value
        object.__setattr__(self, "value", new)
        return old, None


def two_writers_scenario(
    cell_class: type[qsbr.Cell[Any]],
) -> Callable[[Scheduler], dict[str, Callable[[], Any]]]:
    def scenario(sched: Scheduler) -> dict[str, Callable[[], Any]]:
        d = qsbr.Domain(stall_timeout=None)
        instrument(d, sched)
        made = [Resource(0)]
        frees: dict[int, int] = {}

        def count(r: Resource) -> None:  # counts; raising here would only be reported
            frees[r.version] = frees.get(r.version, 0) + 1

        cell = cell_class(made[0], count, domain=d)
        object.__setattr__(cell, "_lock", SchedLock(sched))

        def writer(k: int) -> Callable[[], None]:
            def run() -> None:
                for i in range(2):
                    r = Resource(10 * k + i)
                    made.append(r)
                    cell.set(r)

            return run

        def check() -> None:
            d.poll()  # nobody is attached any more: everything retired runs
            twice = sorted(v for v, n in frees.items() if n > 1)
            assert not twice, f"released twice: {twice}"
            current = cell.value
            assert sorted(frees) == sorted(r.version for r in made if r is not current), "a value was lost"

        sched.after_run(check)
        return {"w1": writer(1), "w2": writer(2)}

    return scenario


def test_scheduler_finds_an_unlocked_cell_and_the_real_cell_survives() -> None:
    modules = ("cell.py",)
    runs, failure = explore(
        two_writers_scenario(UnlockedCell),
        (RandomStrategy(s) for s in range(500)),
        HERE,
        qsbr_modules=modules,
    )
    assert failure is not None, f"{runs} schedules missed the unlocked cell"
    assert "released twice" in str(failure.errors.get("after_run")), failure.describe()
    runs, failure = explore(
        two_writers_scenario(qsbr.Cell), (RandomStrategy(s) for s in range(300)), HERE, qsbr_modules=modules
    )
    assert failure is None, failure.describe()
    runs, failure = exhaustive(two_writers_scenario(qsbr.Cell), 2, HERE, qsbr_modules=modules)
    assert failure is None, failure.describe()
    assert runs > 50


# -- the scheduler itself ----------------------------------------------------------


def test_scheduler_reports_a_deadlock() -> None:
    """Two threads taking two locks in opposite orders: some schedule
    deadlocks, and the scheduler says so instead of hanging."""

    def scenario(sched: Scheduler) -> dict[str, Callable[[], Any]]:
        a, b = SchedLock(sched), SchedLock(sched)

        def one() -> None:
            with a:
                x = 1
                with b:
                    x += 1

        def two() -> None:
            with b:
                y = 1
                with a:
                    y += 1

        return {"one": one, "two": two}

    runs, failure = exhaustive(scenario, preemption_bound=1, files=HERE)
    assert failure is not None and failure.deadlock
    assert threading.active_count() < 50  # aborted runs leave no threads behind


def test_exhaustive_counts_schedules_of_a_tiny_program() -> None:
    """Two threads of two lines each have C(4, 2) = 6 interleavings; with
    one preemption allowed only some of them are reachable."""

    def scenario(sched: Scheduler) -> dict[str, Callable[[], Any]]:
        log: list[str] = []

        def a() -> None:
            log.append("a1")
            log.append("a2")

        def b() -> None:
            log.append("b1")
            log.append("b2")

        runs_logs.append(log)
        return {"a": a, "b": b}

    runs_logs: list[list[str]] = []
    runs, failure = exhaustive(scenario, preemption_bound=10, files=HERE)
    assert failure is None
    seen = {tuple(log) for log in runs_logs}
    assert len(seen) == 6, sorted(seen)
    runs_logs.clear()
    exhaustive(scenario, preemption_bound=0, files=HERE)
    assert {tuple(log) for log in runs_logs} == {("a1", "a2", "b1", "b2"), ("b1", "b2", "a1", "a2")}
