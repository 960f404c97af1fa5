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

Finalizers and the garbage collector are not switch points. A ``__del__``
(such as the thread-exit sentinel of a domain from an earlier run) or a
collection can run on a scheduled thread at any allocation. Pausing the
thread there, or raising the scheduler's abort there, would turn into an
"Exception ignored in ..." report far from the scenario, so a thread is
*quiet* (unscheduled, untraced) from the entry of a ``__del__`` frame to its
return, and from a collection's start to its stop (``gc.callbacks``).

Blocking: a thread that would block on one of the domain's locks must not
block for real, since the thread holding the lock is paused by us. So
``instrument(domain)`` swaps the domain's locks for ``SchedLock``s, which
yield to the scheduler while the lock is held. Scenarios must not use
operations that wait on conditions or sleep (synchronize, barrier, a capped
retire); the scheduler reports a deadlock (no runnable thread) as a failure.
"""

from __future__ import annotations

import gc
import queue
import random
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import CodeType, FrameType, FunctionType
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
    blocking. Threads the scheduler does not run (or does not run now: a
    finalizer, a thread being aborted) use it as a plain lock.

    A lock held by such an outside thread (a thread-exit sentinel running at
    teardown, say) is waited for for real, without a scheduling decision:
    the outsider releases it on its own, and whether it was still held at
    that instant is a matter of real time, which must not change the
    sequence of decisions a seed replays."""

    def __init__(self, sched: Scheduler) -> None:
        self._sched = sched
        self._real = threading.Lock()
        self._owner: int | None = None
        sched._locks.append(self)

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        while True:
            if self._real.acquire(False):
                self._owner = threading.get_ident()
                return True
            if not blocking:
                return False
            me = self._sched._me()
            if me is None or not self._sched._is_scheduled(self._owner):
                if not self._real.acquire(True, timeout):
                    return False
                self._owner = threading.get_ident()
                return True
            self._sched._block_on(me, self)

    def release(self) -> None:
        self._owner = None
        self._real.release()
        self._sched._unblock(self)

    def locked(self) -> bool:
        return self._real.locked()

    __enter__ = acquire

    def __exit__(self, *exc: object) -> None:
        self.release()


def instrument(domain: qsbr.Domain, sched: Scheduler) -> None:
    """Give ``domain`` (all its parts) locks that ``sched`` can schedule around."""
    domain._new_locks(lambda: SchedLock(sched))


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
        self.ended = threading.Event()  # _body has returned (its worker is free)


# -- switch points: how line events reach the scheduler ----------------------------


def _code_objects(files: frozenset[str]) -> list[CodeType]:
    """Every code object defined in ``files`` (modules already imported):
    functions, methods, properties, nested functions and lambdas."""
    found: dict[int, CodeType] = {}

    def add_code(code: CodeType) -> None:
        if code.co_filename in files and id(code) not in found:
            found[id(code)] = code
            for const in code.co_consts:
                if isinstance(const, CodeType):
                    add_code(const)

    def add(obj: Any, seen: set[int]) -> None:
        if id(obj) in seen:
            return
        seen.add(id(obj))
        obj = getattr(obj, "__wrapped__", obj)  # @contextmanager and friends
        if isinstance(obj, (staticmethod, classmethod)):
            obj = obj.__func__
        if isinstance(obj, property):
            for f in (obj.fget, obj.fset, obj.fdel):
                if f is not None:
                    add(f, seen)
        elif isinstance(obj, type):
            for member in vars(obj).values():
                add(member, seen)
        elif isinstance(obj, FunctionType):
            add_code(obj.__code__)

    seen: set[int] = set()
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        if path and str(Path(path).resolve()) in files:
            for member in list(vars(module).values()):
                add(member, seen)
    return list(found.values())


class _Monitoring:
    """Switch points from sys.monitoring (3.12+): LINE (or INSTRUCTION)
    events on the code objects of the chosen files only. sys.settrace there
    re-instruments every function the interpreter runs each time tracing is
    turned on or off, which made a run on 3.13t several times slower."""

    _tool: int | None = None

    def __init__(self, files: frozenset[str], opcodes: bool) -> None:
        self.files = files
        self.opcodes = opcodes
        self.codes: list[CodeType] = []
        self.active: Scheduler | None = None

    def __enter__(self) -> _Monitoring:
        mon = sys.monitoring
        for tool in (mon.DEBUGGER_ID, 1, 2, 3, 4, 5):
            try:
                mon.use_tool_id(tool, "qsbr-interleave")
            except ValueError:
                continue
            self._tool = tool
            break
        else:
            raise RuntimeError("no free sys.monitoring tool id for the interleaving scheduler")
        event = mon.events.INSTRUCTION if self.opcodes else mon.events.LINE
        mon.register_callback(self._tool, event, self._event)
        self.codes = _code_objects(self.files)
        for code in self.codes:
            mon.set_local_events(self._tool, code, event)
        return self

    def __exit__(self, *exc: object) -> None:
        mon = sys.monitoring
        assert self._tool is not None
        for code in self.codes:
            mon.set_local_events(self._tool, code, 0)
        mon.register_callback(self._tool, mon.events.INSTRUCTION if self.opcodes else mon.events.LINE, None)
        mon.free_tool_id(self._tool)

    def _event(self, code: CodeType, where: int) -> None:
        sched = self.active
        if sched is not None:
            sched._switch_point()

    def start_thread(self, sched: Scheduler) -> None:
        pass

    def stop_thread(self) -> None:
        pass


class _SetTrace:
    """Switch points from sys.settrace (3.11), installed only in scheduled threads."""

    def __init__(self, files: frozenset[str], opcodes: bool) -> None:
        self.files = files
        self.opcodes = opcodes
        self.active: Scheduler | None = None

    def __enter__(self) -> _SetTrace:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def start_thread(self, sched: Scheduler) -> None:
        sys.settrace(self._tracer)

    def stop_thread(self) -> None:
        sys.settrace(None)

    def _tracer(self, frame: FrameType, event: str, arg: Any) -> Any:
        if event == "call" and frame.f_code.co_filename in self.files:
            if self.opcodes:
                frame.f_trace_opcodes = True
            return self._local
        return None

    def _local(self, frame: FrameType, event: str, arg: Any) -> Any:
        if event == "line" or event == "opcode":
            sched = self.active
            if sched is not None:
                sched._switch_point()
        return self._local


_Tracing = _Monitoring if hasattr(sys, "monitoring") else _SetTrace


class _Workers:
    """Threads that run the scenario threads of successive runs. Starting a
    thread costs about 1 ms on 3.13t; a session reuses them. A worker takes
    the name of the scenario thread it runs (ThreadState records it)."""

    def __init__(self) -> None:
        self._jobs: list[queue.SimpleQueue[Callable[[], None] | None]] = []
        self._threads: list[threading.Thread] = []

    def start(self, jobs: list[Callable[[], None]]) -> list[int]:
        """Run each job on its own worker; returns the workers' idents."""
        while len(self._threads) < len(jobs):
            inbox: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
            th = threading.Thread(target=self._serve, args=(inbox,), name="interleave-worker", daemon=True)
            th.start()
            self._jobs.append(inbox)
            self._threads.append(th)
        for inbox, job in zip(self._jobs, jobs, strict=False):
            inbox.put(job)
        return [th.ident for th in self._threads[: len(jobs)] if th.ident is not None]

    @staticmethod
    def _serve(inbox: queue.SimpleQueue[Callable[[], None] | None]) -> None:
        while (job := inbox.get()) is not None:
            job()

    def close(self) -> None:
        for inbox in self._jobs:
            inbox.put(None)
        for th in self._threads:
            th.join(RUN_TIMEOUT)


class Session:
    """What successive runs can share: the switch-point instrumentation and
    the worker threads. explore() and exhaustive() open one for all their
    runs; a Scheduler used alone opens its own for its one run."""

    def __init__(
        self, files: Iterable[str] = (), opcodes: bool = False, qsbr_modules: Iterable[str] | None = None
    ) -> None:
        self.files = _switch_point_files(files, qsbr_modules)
        self.opcodes = opcodes
        self.tracing = _Tracing(self.files, opcodes)
        self.workers = _Workers()

    def __enter__(self) -> Session:
        self.tracing.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.workers.close()
        self.tracing.__exit__()


def _switch_point_files(files: Iterable[str], qsbr_modules: Iterable[str] | None) -> frozenset[str]:
    chosen = QSBR_FILES
    if qsbr_modules is not None:
        names = set(qsbr_modules)
        chosen = frozenset(f for f in QSBR_FILES if Path(f).name in names)
        unknown = names - {Path(f).name for f in chosen}
        if unknown:
            raise ValueError(f"no qsbr module named {sorted(unknown)}")
    return chosen | {str(Path(f).resolve()) for f in files}


# -- the scheduler -------------------------------------------------------------


class Scheduler:
    """Runs one scenario under one strategy, one thread at a time."""

    def __init__(
        self,
        strategy: Strategy,
        files: Iterable[str] = (),
        opcodes: bool = False,
        qsbr_modules: Iterable[str] | None = None,
        session: Session | None = None,
    ) -> None:
        """``files``: the scenario's own source files (their lines are
        switch points too). ``qsbr_modules``: which of qsbr's modules give
        switch points, by file name (e.g. ``("scan.py",)``); None = all.
        Fewer points make deep bugs in the chosen module likelier to be hit.
        ``session``: share instrumentation and threads with other runs (it
        fixes files, opcodes and modules)."""
        self.strategy = strategy
        self._own_session = session is None
        self.session = session if session is not None else Session(files, opcodes, qsbr_modules)
        self.files = self.session.files
        self._threads: list[_Thread] = []
        self._by_ident: dict[int, _Thread] = {}
        self._current: _Thread | None = None
        self._finished = threading.Event()
        self._aborting = False
        self._after: list[Callable[[], Any]] = []
        #: Every SchedLock made for this run (see _release_abandoned_locks).
        self._locks: list[SchedLock] = []
        #: thread ident -> how many collections it is inside (see the module
        #: docstring: no switch point fires there). Each entry is written
        #: only by its own thread.
        self._in_gc: dict[int, int] = {}
        self.outcome = Outcome(repr(strategy))

    def after_run(self, check: Callable[[], Any]) -> None:
        """Run ``check`` once every thread has finished (unscheduled, in the
        caller's thread); an exception from it fails the run. For invariants
        no single thread can see, e.g. that nothing was released twice."""
        self._after.append(check)

    # -- used by the threads -------------------------------------------------

    def _me(self) -> _Thread | None:
        """The scheduled thread calling, or None: an outside thread, a
        scheduled one that finished, one inside a finalizer or a collection
        (see the module docstring), or any thread once the run is being
        aborted (it unwinds as a plain thread)."""
        if self._aborting:
            return None
        ident = threading.get_ident()
        t = self._by_ident.get(ident)
        if t is None or t.done or self._in_gc.get(ident) or _in_finalizer():
            return None
        return t

    def _is_scheduled(self, ident: int | None) -> bool:
        """Whether ``ident`` is a scheduled thread that has not finished."""
        t = self._by_ident.get(ident) if ident is not None else None
        return t is not None and not t.done

    def _gc_callback(self, phase: str, info: dict[str, Any]) -> None:
        # Runs in the collecting thread, around every finalizer and weakref
        # callback of the collection.
        ident = threading.get_ident()
        if phase == "start":
            self._in_gc[ident] = self._in_gc.get(ident, 0) + 1
        elif self._in_gc.get(ident):
            self._in_gc[ident] -= 1

    def _switch_point(self) -> None:
        if self._current is None or self._current.done:
            return
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
            raise _Abort  # the run is over (deadlock or too long)
        if nxt is not me:
            self._current = nxt
            nxt.go.release()
            me.go.acquire()
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
        threading.current_thread().name = t.name
        tracing = self.session.tracing
        t.go.acquire()
        try:
            if not self._aborting:
                tracing.start_thread(self)
                try:
                    t.fn()
                finally:
                    tracing.stop_thread()
        except _Abort:
            pass
        except BaseException as exc:  # noqa: BLE001 - reported in the outcome
            if self._aborting:
                return  # unwinding an aborted run freely: not part of the schedule
            self.outcome.errors[t.name] = exc
            # The first failure ends the run: what the other threads would
            # do next depends on real time (this thread may still be
            # registered and holding a lock), and a replay must see the
            # same decisions.
            self._abort()
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
            t.ended.set()

    def _release_abandoned_locks(self) -> None:
        """After an aborted run, release the locks its threads still hold.

        The abort is an exception raised at a switch point, and on 3.11 a
        line event fires for a ``with lock:`` line after ``__enter__`` has
        returned, before the block's cleanup is in force: a thread aborted
        there unwinds with the lock held. The run is over and its domain
        abandoned, but the workers' thread-exit sentinels still unregister
        from it later, and would wait on that lock for ever."""
        for t in self._threads:
            t.done = True
        mine = set(self._by_ident)
        for lock in self._locks:
            if lock._owner in mine and lock.locked():
                lock._owner = None
                lock._real.release()

    # -- used by tests ----------------------------------------------------------

    def run(self, threads: dict[str, Callable[[], Any]]) -> Outcome:
        """Run each callable in its own thread, interleaved by the strategy."""
        session = self.session
        if self._own_session:
            session.__enter__()
        gc.callbacks.append(self._gc_callback)
        session.tracing.active = self
        try:
            return self._run(threads)
        finally:
            session.tracing.active = None
            gc.callbacks.remove(self._gc_callback)
            if self._own_session:
                session.__exit__()

    def _run(self, threads: dict[str, Callable[[], Any]]) -> Outcome:
        self.strategy.start(list(threads))
        self._threads = [_Thread(i, name, fn) for i, (name, fn) in enumerate(threads.items())]
        idents = self.session.workers.start([lambda t=t: self._body(t) for t in self._threads])
        self._by_ident = dict(zip(idents, self._threads, strict=True))
        first = self._pick(None)
        assert first is not None
        self._current = first
        first.go.release()
        if not self._finished.wait(RUN_TIMEOUT):
            self.outcome.errors.setdefault("scheduler", TimeoutError(f"run took over {RUN_TIMEOUT} s"))
            self._abort()
        for t in self._threads:
            if not t.ended.wait(RUN_TIMEOUT):
                raise RuntimeError(f"scenario thread {t.name!r} did not end within {RUN_TIMEOUT} s")
        if self._aborting:
            self._release_abandoned_locks()
        if not self._aborting:
            for check in self._after:
                try:
                    check()
                except Exception as exc:  # noqa: BLE001 - reported in the outcome
                    self.outcome.errors.setdefault("after_run", exc)
        return self.outcome


def _in_finalizer() -> bool:
    """Whether the calling thread is inside a ``__del__`` (see the module
    docstring), looking up the stack as far as the scheduler's own frame."""
    f: FrameType | None = sys._getframe(1)
    while f is not None:
        code = f.f_code
        if code is _BODY_CODE:
            return False
        if code.co_name == "__del__":
            return True
        f = f.f_back
    return False


_BODY_CODE = Scheduler._body.__code__


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
    runs = 0
    with Session(files, opcodes, qsbr_modules) as session:
        for strategy in strategies:
            sched = Scheduler(strategy, session=session)
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
    prefix: list[int] | None = []
    runs = 0
    with Session(files, qsbr_modules=qsbr_modules) as session:
        while runs < limit and prefix is not None:
            sched = Scheduler(Replay(prefix), session=session)
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
