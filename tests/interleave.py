"""A deterministic scheduler that runs real threads through real qsbr code.

Two or three threads run a scenario (register, load a shared resource, use
it, quiesce, retire, poll, ...) against an actual ``Domain``, but only one
thread runs at a time. Every line of qsbr's source and of the scenario is a
*switch point* (``sys.settrace`` line events, or every bytecode with
``opcodes=True``): there the scheduler decides which thread runs next. The
decisions come from a *strategy*:

* ``RandomStrategy(seed)``: a uniformly random runnable thread at each point.
* ``PCTStrategy(seed, depth)``: probabilistic concurrency testing (Burckhardt
  et al., ASPLOS 2010). Threads get random priorities, the highest runnable
  one runs, and at ``depth - 1`` random steps the running thread drops to the
  lowest priority. It finds any bug of depth d with probability at least
  1/(n k^(d-1)) per run, for n threads and k steps.
* ``exhaustive(scenario, preemption_bound)``: every schedule with at most that many
  preemptions (switching away from a thread that could go on), by stateless
  depth-first search. Complete for tiny scenarios.

A run records its decisions, so a failure is replayed exactly, either from
the strategy and seed (``RandomStrategy(seed)`` again), or from the recorded
choice list (``Replay(choices)``). Nothing here costs anything in normal runs:
the tracing is installed only in the threads a scheduler starts.

Blocking: a thread that would block on one of the domain's locks must not
block for real, since the thread holding the lock is paused by us. So
``instrument(domain)`` swaps the domain's locks for ``SchedLock``s, which
yield to the scheduler while the lock is held. Scenarios must not use
operations that wait on conditions or sleep (synchronize, barrier, a capped
retire); the scheduler reports a deadlock (no runnable thread) as a failure.
"""

from __future__ import annotations

import random
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import qsbr

#: qsbr's own source files: every line in them is a switch point.
QSBR_FILES = frozenset(str(p) for p in Path(qsbr.__file__).resolve().parent.glob("*.py"))

#: Per-run bound: a schedule that takes more steps than this is a livelock.
MAX_STEPS = 200_000
#: Real-time bound on one run, so a scheduler bug cannot hang the suite.
RUN_TIMEOUT = 30.0


class Deadlock(Exception):
    """Every unfinished thread is blocked on a SchedLock."""


class _Abort(BaseException):
    """Raised in paused threads when a run is given up (deadlock, too long)."""


# -- strategies ------------------------------------------------------------


class Strategy:
    """Chooses the next thread at each switch point."""

    def start(self, names: Sequence[str]) -> None:
        """A new run with these threads (in a fixed order)."""

    def choose(self, current: int | None, runnable: list[int], step: int) -> int:
        """Index (into the thread list) of the thread to run next.

        ``current`` is the running thread when it could go on (then it is in
        ``runnable``), or None when it finished or blocked."""
        raise NotImplementedError


class RandomStrategy(Strategy):
    """At each switch point, switch to a random other runnable thread with
    probability p, else go on. p is drawn per run from the seed, log-uniform
    in [0.005, 0.5]: small p gives long uninterrupted stretches (a writer
    that runs a whole retire-and-poll while a reader sits between a load
    and a use), large p gives fine-grained interleavings."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.p = 0.005 * 100 ** self.rng.random()

    def choose(self, current: int | None, runnable: list[int], step: int) -> int:
        if current is not None and (len(runnable) == 1 or self.rng.random() >= self.p):
            return current
        others = [i for i in runnable if i != current]
        return self.rng.choice(others)

    def __repr__(self) -> str:
        return f"RandomStrategy(seed={self.seed})"


class PCTStrategy(Strategy):
    def __init__(self, seed: int, depth: int = 3, steps: int = 2000) -> None:
        self.seed, self.depth, self.steps = seed, depth, steps
        self.rng = random.Random(seed)

    def start(self, names: Sequence[str]) -> None:
        n = len(names)
        # Initial priorities depth .. depth+n-1 (distinct, random order);
        # change points lower the running thread to depth-1, depth-2, ...
        prios = list(range(self.depth, self.depth + n))
        self.rng.shuffle(prios)
        self.prio = prios
        self.changes = sorted(self.rng.sample(range(1, self.steps), self.depth - 1))
        self.next_low = self.depth - 1

    def choose(self, current: int | None, runnable: list[int], step: int) -> int:
        while self.changes and step >= self.changes[0]:
            self.changes.pop(0)
            if current is not None:
                self.prio[current] = self.next_low
                self.next_low -= 1
        return max(runnable, key=lambda i: self.prio[i])

    def __repr__(self) -> str:
        return f"PCTStrategy(seed={self.seed}, depth={self.depth}, steps={self.steps})"


class Replay(Strategy):
    """Follows recorded decisions (see Outcome.choices), then runs each
    thread as long as it can (no preemption) once they run out."""

    def __init__(self, choices: Sequence[int]) -> None:
        self.choices = list(choices)

    def start(self, names: Sequence[str]) -> None:
        self.k = 0

    def choose(self, current: int | None, runnable: list[int], step: int) -> int:
        options = _options(current, runnable)
        if len(options) == 1:
            return options[0]
        if self.k < len(self.choices):
            pick = self.choices[self.k]
            self.k += 1
            if pick < len(options):
                return options[pick]
        return options[0]

    def __repr__(self) -> str:
        return f"Replay({self.choices})"


def _options(current: int | None, runnable: list[int]) -> list[int]:
    """The canonical order of choices: going on first, then thread order."""
    if current is None:
        return list(runnable)
    return [current] + [i for i in runnable if i != current]


# -- locks the scheduler can see ----------------------------------------------


class SchedLock:
    """A Lock for scheduled threads: acquiring a held lock yields instead of
    blocking. Threads the scheduler does not run use it as a plain lock."""

    def __init__(self, sched: Scheduler) -> None:
        self._sched = sched
        self._real = threading.Lock()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        if self._real.acquire(False):
            return True
        if not blocking:
            return False
        me = self._sched._me()
        if me is None:  # not a scheduled thread
            return self._real.acquire(True, timeout)
        while not self._real.acquire(False):
            self._sched._block_on(me, self)
        return True

    def release(self) -> None:
        self._real.release()
        self._sched._unblock(self)

    def locked(self) -> bool:
        return self._real.locked()

    __enter__ = acquire

    def __exit__(self, *exc: object) -> None:
        self.release()


def instrument(domain: qsbr.Domain, sched: Scheduler) -> None:
    """Give ``domain`` locks that ``sched`` can schedule around."""
    domain._lock = SchedLock(sched)  # type: ignore[assignment]
    domain._registry._lock = SchedLock(sched)  # type: ignore[assignment]
    work = domain._work
    work._lock = SchedLock(sched)  # type: ignore[assignment]
    work._batch_done = threading.Condition(work._lock)  # type: ignore[arg-type]
    work._space = threading.Condition(work._lock)  # type: ignore[arg-type]
    domain._stalls._lock = SchedLock(sched)  # type: ignore[assignment]
    scanner = domain._scanner
    if hasattr(scanner, "_lock"):
        scanner._lock = SchedLock(sched)


# -- the scheduler -------------------------------------------------------------


@dataclass
class Outcome:
    """One run: what was decided, and how it ended."""

    strategy: str
    choices: list[int] = field(default_factory=list)
    steps: int = 0
    errors: dict[str, BaseException] = field(default_factory=dict)
    deadlock: bool = False
    #: Per decision: how many options there were, and whether choosing
    #: other than option 0 preempts a thread that could go on.
    options: list[tuple[int, bool]] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return bool(self.errors) or self.deadlock

    def describe(self) -> str:
        what = "deadlock" if self.deadlock else "; ".join(f"{k}: {v!r}" for k, v in self.errors.items())
        return f"{what} under {self.strategy} (replay: Replay({self.choices}))"


class _Thread:
    def __init__(self, index: int, name: str, fn: Callable[[], Any]) -> None:
        self.index, self.name, self.fn = index, name, fn
        self.go = threading.Semaphore(0)
        self.done = False
        self.blocked_on: SchedLock | None = None
        self.thread: threading.Thread | None = None


class Scheduler:
    """Runs one scenario under one strategy, one thread at a time."""

    def __init__(
        self,
        strategy: Strategy,
        files: Iterable[str] = (),
        opcodes: bool = False,
        qsbr_modules: Iterable[str] | None = None,
    ) -> None:
        """``files``: the scenario's own source files (their lines are
        switch points too). ``qsbr_modules``: which of qsbr's modules give
        switch points, by file name (e.g. ``("scan.py",)``); None = all.
        Fewer points make deep bugs in the chosen module likelier to be hit."""
        self.strategy = strategy
        chosen = QSBR_FILES
        if qsbr_modules is not None:
            names = set(qsbr_modules)
            chosen = frozenset(f for f in QSBR_FILES if Path(f).name in names)
            unknown = names - {Path(f).name for f in chosen}
            if unknown:
                raise ValueError(f"no qsbr module named {sorted(unknown)}")
        self.files = chosen | {str(Path(f).resolve()) for f in files}
        self.opcodes = opcodes
        self._threads: list[_Thread] = []
        self._by_ident: dict[int, _Thread] = {}
        self._current: _Thread | None = None
        self._finished = threading.Event()
        self._aborting = False
        self._after: list[Callable[[], Any]] = []
        self.outcome = Outcome(repr(strategy))

    def after_run(self, check: Callable[[], Any]) -> None:
        """Run ``check`` once every thread has finished (unscheduled, in the
        caller's thread); an exception from it fails the run. For invariants
        no single thread can see, e.g. that nothing was released twice."""
        self._after.append(check)

    # -- used by the threads -------------------------------------------------

    def _me(self) -> _Thread | None:
        """The scheduled thread calling, or None (an outside thread, or a
        scheduled one that finished: e.g. its exit sentinel running)."""
        t = self._by_ident.get(threading.get_ident())
        return None if t is None or t.done else t

    def _tracer(self, frame: FrameType, event: str, arg: Any) -> Any:
        if event == "call" and frame.f_code.co_filename in self.files:
            if self.opcodes:
                frame.f_trace_opcodes = True
            return self._local
        return None

    def _local(self, frame: FrameType, event: str, arg: Any) -> Any:
        if event == "line" or event == "opcode":
            self._switch_point()
        return self._local

    def _switch_point(self) -> None:
        me = self._me()
        if me is None or self._current is not me:
            return
        self._schedule(me, can_go_on=True)

    def _block_on(self, me: _Thread, lock: SchedLock) -> None:
        me.blocked_on = lock
        self._schedule(me, can_go_on=False)

    def _unblock(self, lock: SchedLock) -> None:
        for t in self._threads:
            if t.blocked_on is lock:
                t.blocked_on = None

    def _schedule(self, me: _Thread, can_go_on: bool) -> None:
        """Pick the next thread; if it is not ``me``, pass it the baton and
        wait until it comes back."""
        nxt = self._pick(me if can_go_on else None)
        if nxt is None:
            return  # the run is over (deadlock or too long): aborting
        if nxt is not me:
            self._current = nxt
            nxt.go.release()
            me.go.acquire()
            if self._aborting:
                raise _Abort
        if self._aborting:
            raise _Abort

    def _pick(self, current: _Thread | None) -> _Thread | None:
        out = self.outcome
        out.steps += 1
        if out.steps > MAX_STEPS:
            out.errors.setdefault("scheduler", RuntimeError(f"more than {MAX_STEPS} steps: livelock?"))
            self._abort()
            return None
        runnable = [t.index for t in self._threads if not t.done and t.blocked_on is None]
        if not runnable:
            if any(not t.done for t in self._threads):
                out.deadlock = True
                self._abort()
            return None
        cur = current.index if current is not None else None
        options = _options(cur, runnable)
        pick = self.strategy.choose(cur, runnable, out.steps)
        if len(options) > 1:
            out.choices.append(options.index(pick))
            out.options.append((len(options), cur is not None))
        return self._threads[pick]

    def _abort(self) -> None:
        self._aborting = True
        for t in self._threads:
            t.go.release()
        self._finished.set()

    def _body(self, t: _Thread) -> None:
        t.go.acquire()
        try:
            if not self._aborting:
                sys.settrace(self._tracer)
                try:
                    t.fn()
                finally:
                    sys.settrace(None)
        except _Abort:
            pass
        except BaseException as exc:  # noqa: BLE001 - reported in the outcome
            self.outcome.errors[t.name] = exc
        finally:
            t.done = True
            t.blocked_on = None
            if all(x.done for x in self._threads):
                self._finished.set()
            elif not self._aborting:
                nxt = self._pick(None)
                if nxt is not None:
                    self._current = nxt
                    nxt.go.release()

    # -- used by tests ----------------------------------------------------------

    def run(self, threads: dict[str, Callable[[], Any]]) -> Outcome:
        """Run each callable in its own thread, interleaved by the strategy."""
        self.strategy.start(list(threads))
        self._threads = [_Thread(i, name, fn) for i, (name, fn) in enumerate(threads.items())]
        for t in self._threads:
            th = threading.Thread(target=self._body, args=(t,), name=t.name, daemon=True)
            t.thread = th
            th.start()
            assert th.ident is not None
            self._by_ident[th.ident] = t
        first = self._pick(None)
        assert first is not None
        self._current = first
        first.go.release()
        if not self._finished.wait(RUN_TIMEOUT):
            self.outcome.errors.setdefault("scheduler", TimeoutError(f"run took over {RUN_TIMEOUT} s"))
            self._abort()
        for t in self._threads:
            assert t.thread is not None
            t.thread.join(RUN_TIMEOUT)
        if not self._aborting:
            for check in self._after:
                try:
                    check()
                except Exception as exc:  # noqa: BLE001 - reported in the outcome
                    self.outcome.errors.setdefault("after_run", exc)
        return self.outcome


Scenario = Callable[["Scheduler"], dict[str, Callable[[], Any]]]
"""Builds a fresh world (domain, shared state) for one run and returns the
threads to run; it may call instrument(domain, sched) and must raise
(AssertionError) in a thread when that thread sees something wrong."""


def explore(
    scenario: Scenario,
    strategies: Iterable[Strategy],
    files: Iterable[str] = (),
    opcodes: bool = False,
    qsbr_modules: Iterable[str] | None = None,
) -> tuple[int, Outcome | None]:
    """Run the scenario under each strategy; stop at the first failure.

    Returns (runs made, the failing outcome or None)."""
    files = list(files)
    modules = None if qsbr_modules is None else list(qsbr_modules)
    runs = 0
    for strategy in strategies:
        sched = Scheduler(strategy, files, opcodes, modules)
        out = sched.run(scenario(sched))
        runs += 1
        if out.failed:
            return runs, out
    return runs, None


def exhaustive(
    scenario: Scenario,
    preemption_bound: int,
    files: Iterable[str] = (),
    limit: int = 100_000,
    qsbr_modules: Iterable[str] | None = None,
) -> tuple[int, Outcome | None]:
    """Every schedule with at most ``preemption_bound`` preemptions (stateless
    DFS over the recorded decisions); stops at the first failure."""
    files = list(files)
    modules = None if qsbr_modules is None else list(qsbr_modules)
    prefix: list[int] = []
    runs = 0
    while runs < limit:
        sched = Scheduler(Replay(prefix), files, qsbr_modules=modules)
        out = sched.run(scenario(sched))
        runs += 1
        if out.failed:
            return runs, out
        prefix = _next_prefix(out, preemption_bound)
        if prefix is None:
            return runs, None
    raise RuntimeError(f"exhaustive(): more than {limit} schedules; lower the bound or the scenario")


def _next_prefix(out: Outcome, bound: int) -> list[int] | None:
    """The next schedule in DFS order: bump the deepest decision that has an
    untried option within the preemption bound."""
    choices = out.choices
    for i in range(len(choices) - 1, -1, -1):
        n, preemptible = out.options[i]
        if choices[i] + 1 >= n:
            continue
        used = sum(1 for c, (_, p) in zip(choices[:i], out.options[:i], strict=True) if p and c != 0)
        if preemptible and used + 1 > bound:
            continue
        return choices[:i] + [choices[i] + 1]
    return None
