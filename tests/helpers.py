"""What the test files share: a resource that counts its releases, threads
run with a deadline, a thread driven step by step, parked readers, waits
bounded by time, and a deliberately broken scanner.

Every wait here is bounded by a deadline in seconds, never by a number of
iterations: the machines that run the suite are shared and their speed
varies by an order of magnitude.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import qsbr
from qsbr.registry import Registry
from qsbr.thread_state import ThreadState

#: The most any single step of a test may take (a thread call, a join, a wait).
STEP_TIMEOUT = 10.0


class Deadline:
    """``while not done and Deadline(s): ...`` loops for at most ``s`` seconds."""

    def __init__(self, seconds: float = STEP_TIMEOUT) -> None:
        self.end = time.monotonic() + seconds

    def __bool__(self) -> bool:
        """True while time is left."""
        return time.monotonic() < self.end

    @property
    def left(self) -> float:
        return max(0.0, self.end - time.monotonic())


def wait_until(pred: Callable[[], bool], timeout: float = STEP_TIMEOUT) -> bool:
    """Poll pred until true or timeout; for events with no signal to wait on."""
    deadline = Deadline(timeout)
    while deadline:
        if pred():
            return True
        time.sleep(0.001)
    return pred()


def read(domain: qsbr.Domain, fn: Callable[[], Any]) -> Any:
    """``fn()`` inside a read section, the way a test's own thread reads a
    structure (debug mode refuses an unprotected read); the thread is left
    as it was, unregistered if it was. What comes back is for identity and
    value checks: it is no longer protected once this returns."""
    was_registered = domain.is_registered()
    with domain.attached():
        out = fn()
    if not was_registered:
        domain.unregister()
    return out


class Resource:
    """A shared resource with an explicit release, as the library's users have
    (a model, an mmap): ``use()`` after ``release()`` is the bug QSBR
    prevents, and a second ``release()`` is the other one."""

    __slots__ = ("version", "releases")

    def __init__(self, version: int = 0) -> None:
        self.version = version
        self.releases = 0

    @property
    def released(self) -> bool:
        return self.releases > 0

    def use(self) -> int:
        assert self.releases == 0, f"resource v{self.version} used after it was released"
        return self.version

    def release(self) -> None:
        self.releases += 1
        assert self.releases == 1, f"resource v{self.version} released twice"

    def __repr__(self) -> str:
        return f"<Resource v{self.version} releases={self.releases}>"


def run_threads(*targets: Callable[[], Any], timeout: float = STEP_TIMEOUT) -> None:
    """Run each target in its own thread, all at once, and join them within
    ``timeout`` seconds (in all). The first exception a thread raised is
    raised here, so a failing thread fails the test."""
    errors: list[BaseException] = []

    def guarded(fn: Callable[[], Any]) -> Callable[[], None]:
        def run() -> None:
            try:
                fn()
            except BaseException as exc:  # noqa: BLE001 - handed back to the test
                errors.append(exc)

        return run

    threads = [threading.Thread(target=guarded(fn), name=getattr(fn, "__name__", "t")) for fn in targets]
    for t in threads:
        t.start()
    deadline = Deadline(timeout)
    for t in threads:
        t.join(deadline.left)
    alive = [t.name for t in threads if t.is_alive()]
    assert not alive, f"threads still running after {timeout} s: {alive}"
    if errors:
        raise errors[0]


class Worker:
    """A thread that runs the callables it is sent, one at a time.

    ``call(fn)`` runs fn in the worker and returns its result (or raises its
    exception) within STEP_TIMEOUT seconds, so a test can put a second
    thread exactly where it wants it: registered, holding a resource,
    quiescent, detached, gone.
    """

    def __init__(self, name: str = "worker") -> None:
        self._inbox: queue.Queue[Callable[[], Any] | None] = queue.Queue()
        self._outbox: queue.Queue[tuple[bool, Any]] = queue.Queue()
        self.thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            fn = self._inbox.get()
            if fn is None:
                return
            try:
                self._outbox.put((True, fn()))
            except BaseException as exc:  # noqa: BLE001 - handed back to the test
                self._outbox.put((False, exc))

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        self._inbox.put(lambda: fn(*args))
        ok, value = self._outbox.get(timeout=STEP_TIMEOUT)
        if not ok:
            raise value
        return value

    def stop(self) -> None:
        self._inbox.put(None)
        self.thread.join(timeout=STEP_TIMEOUT)
        assert not self.thread.is_alive(), "worker did not stop"


class ParkedReaders:
    """``n`` registered, attached threads that report a quiescent state only
    when the test starts a round (as readers between requests would)."""

    def __init__(self, domain: qsbr.Domain, n: int) -> None:
        self.domain = domain
        self.n = n
        self._cond = threading.Condition()
        self._round = 0
        self._stop = False
        ready = threading.Barrier(n + 1, timeout=STEP_TIMEOUT * 6)
        self._threads = [threading.Thread(target=self._run, args=(ready,), daemon=True) for _ in range(n)]
        for t in self._threads:
            t.start()
        ready.wait()

    def _run(self, ready: threading.Barrier) -> None:
        d = self.domain
        d.register()
        seen = 0
        ready.wait()
        with self._cond:
            while True:
                self._cond.wait_for(lambda seen=seen: self._round != seen or self._stop)  # type: ignore[misc]
                if self._stop:
                    break
                seen = self._round
                d.quiescent()
        d.unregister()

    def start_round(self) -> None:
        """Every reader passes one quiescent state, soon."""
        with self._cond:
            self._round += 1
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        deadline = Deadline(STEP_TIMEOUT * 6)
        for t in self._threads:
            t.join(deadline.left)
        assert not any(t.is_alive() for t in self._threads), "parked readers did not stop"


class IgnoresReadersScan:
    """Broken on purpose: every scan reports rd_seq = wr_seq, as if no
    reader held anything. Tests inject it (Domain._set_scanner) to show they
    can fail."""

    name = "ignores-readers"

    def __init__(self, registry: Registry) -> None:
        pass

    def scan(self, wr_seq: int, caller: ThreadState | None, full: bool = False) -> tuple[int | None, bool]:
        return wr_seq, False

    def new_locks(self, factory: Callable[[], Any]) -> None:
        pass

    def after_fork_in_child(self) -> None:
        pass


def domain_that_ignores_readers(**options: Any) -> qsbr.Domain:
    """A Domain whose rd_seq jumps to wr_seq, ignoring every reader."""
    d = qsbr.Domain(**options)
    d._set_scanner(IgnoresReadersScan)
    return d
