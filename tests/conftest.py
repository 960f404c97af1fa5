"""Shared test helpers: a thread driven step by step, every wait bounded."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import qsbr

STEP_TIMEOUT = 10.0


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
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def _run(self) -> None:
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


#: Every semantic test that takes the ``domain`` fixture runs under each
#: rd_seq strategy.
SCAN_STRATEGIES = ["incremental", "flat"]


@pytest.fixture(params=SCAN_STRATEGIES)
def scan(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def domain(scan: str) -> Iterator[qsbr.Domain]:
    d = qsbr.Domain(scan=scan)
    yield d
    d.close()


@pytest.fixture
def worker() -> Iterator[Worker]:
    w = Worker()
    yield w
    w.stop()


@pytest.fixture
def make_worker() -> Iterator[Callable[[str], Worker]]:
    made: list[Worker] = []

    def make(name: str = "worker") -> Worker:
        w = Worker(name)
        made.append(w)
        return w

    yield make
    for w in made:
        w.stop()


def wait_until(pred: Callable[[], bool], timeout: float = STEP_TIMEOUT) -> bool:
    """Poll pred until true or timeout; for events with no signal to wait on."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.001)
    return pred()
