"""Stress: readers use the current resource and quiesce now and then while a
writer swaps it and retires the old one. A reader that ever sees a released
resource fails the test; at the end barrier() leaves nothing pending and each
resource was released exactly once."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import pytest

import qsbr
from helpers import Resource, domain_that_ignores_readers, run_threads

HOLD = 50
SECONDS = float(os.environ.get("QSBR_STRESS_SECONDS", "2.0"))


class Box:
    """The shared slot readers load from; the writer stores into it."""

    __slots__ = ("current",)

    def __init__(self, r: Resource) -> None:
        self.current = r


def run_stress(domain: qsbr.Domain, seconds: float) -> tuple[list[str], list[Resource], list[int]]:
    """Returns (use-after-release reports, every resource, reads per reader).
    A thread that crashes fails the calling test (run_threads re-raises)."""
    box = Box(Resource(0))
    all_resources: list[Resource] = [box.current]
    stop = threading.Event()
    failures: list[str] = []
    reads = [0] * 4

    def reader(k: int) -> None:
        n = 0
        with domain.registered():
            # Half the readers report through their ThreadHandle.
            quiescent = domain.handle().quiescent if k % 2 else domain.quiescent
            while not stop.is_set():
                r = box.current  # lock-free load
                for _ in range(HOLD):  # use it for a while
                    if r.releases:
                        failures.append(f"reader {k} saw version {r.version} released")
                        return
                n += 1
                if n % 16 == 0:
                    quiescent()
                if n % 4096 == 0:
                    with domain.detached():
                        pass
        reads[k] = n

    def writer() -> None:
        try:
            write()
        finally:
            stop.set()

    def write() -> None:
        version = 0
        with domain.registered():
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                version += 1
                new = Resource(version)
                all_resources.append(new)
                old, box.current = box.current, new  # unlink
                domain.retire(old, Resource.release)
                domain.quiescent()  # the writer holds nothing across swaps
                if version % 64 == 0:
                    domain.poll()

    run_threads(writer, *(lambda k=k: reader(k) for k in range(4)), timeout=seconds + 60)
    return failures, all_resources, reads


@pytest.mark.timeout(120)
@pytest.mark.parametrize("background", [False, True], ids=["writer-polls", "reclaimer"])
@pytest.mark.parametrize("deferred_limit", [1, 10])
def test_readers_never_see_a_released_resource(background: bool, deferred_limit: int, scan: str) -> None:
    domain = qsbr.Domain(deferred_limit=deferred_limit, background=background, scan=scan)
    failures, all_resources, reads = run_stress(domain, SECONDS)
    assert not failures, failures[:5]
    box_last = all_resources[-1]
    # Retire the last version too, then drain.
    with domain.registered():
        domain.retire(box_last, Resource.release)
    assert domain.barrier(timeout=30)
    assert domain.pending == 0
    counts: dict[int, Any] = {r.version: r.releases for r in all_resources}
    assert set(counts.values()) == {1}, {v: c for v, c in counts.items() if c != 1}
    s = domain.stats()
    assert s.releases == len(all_resources) and s.release_errors == 0
    assert len(all_resources) > 10 and sum(reads) > 0
    domain.close()


@pytest.mark.timeout(120)
def test_the_stress_test_catches_a_domain_that_ignores_readers() -> None:
    """The check above can fail: a domain that ignores readers is caught."""
    failures: list[str] = []
    for _ in range(5):  # a race: a few rounds make a miss vanishingly unlikely
        failures, _, _ = run_stress(domain_that_ignores_readers(deferred_limit=1), 1.0)
        if failures:
            break
    assert failures, "the stress harness did not notice releases under live readers"
