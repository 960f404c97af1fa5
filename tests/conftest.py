"""Fixtures: a domain per rd_seq strategy, worker threads (helpers.py has
the shared helpers themselves)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from processes import Child

import qsbr
from helpers import STEP_TIMEOUT, Worker, wait_until

__all__ = ["STEP_TIMEOUT", "Worker", "wait_until"]

#: Every semantic test that takes the ``domain`` fixture runs under each
#: rd_seq strategy.
SCAN_STRATEGIES = ["incremental", "flat"]


@pytest.fixture(params=SCAN_STRATEGIES)
def scan(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def debug() -> bool:
    """Whether the ``domain`` fixture is in debug mode: False, except in the
    modules that set ``DEBUG_TOO = True`` (the structures' tests), which run
    both ways (pytest_generate_tests below)."""
    return False


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "debug" in metafunc.fixturenames and getattr(metafunc.module, "DEBUG_TOO", False):
        metafunc.parametrize("debug", [False, True], ids=["plain", "debug"])


@pytest.fixture
def domain(scan: str, debug: bool) -> Iterator[qsbr.Domain]:
    d = qsbr.Domain(scan=scan, debug=debug)
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


@pytest.fixture
def children() -> Iterator[Callable[[], Child]]:
    """Make child interpreters (processes.Child); each is killed at the end."""
    made: list[Child] = []

    def make() -> Child:
        child = Child()
        made.append(child)
        return child

    yield make
    for child in made:
        child.close()
