"""A torture test after liburcu's rcutorture.

Each version's *age* counts grace periods since it was unlinked: its release
raises the age by one and retires it again, PIPELINE times, and only then
frees it. A reader records the age of every version it uses, at the end of its
read-side section. While a reader holds a version, no grace period can end
after the version was unlinked, so the protocol allows exactly one age: 0.
Anything older is a reader using a version that the protocol already declared
safe to free. At the end every version must have been freed exactly once.

CI runs it for a short bounded time on each build and strategy;
`make torture SECONDS=300` runs it longer (QSBR_TORTURE_SECONDS).
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from typing import Any

import pytest

import qsbr
from helpers import domain_that_ignores_readers, run_threads

SECONDS = float(os.environ.get("QSBR_TORTURE_SECONDS", "1.5"))
PIPELINE = 3  # grace periods a version lives through after it is unlinked
READERS = 3


class Version:
    __slots__ = ("n", "age", "freed", "free_count")

    def __init__(self, n: int) -> None:
        self.n = n
        self.age = 0
        self.freed = False
        self.free_count = 0


def torture(domain: qsbr.Domain, seconds: float) -> tuple[Counter[int], list[Version], int]:
    """Returns (histogram of ages seen by readers, every version, reads)."""
    box = [Version(0)]
    versions = [box[0]]
    histogram: Counter[int] = Counter()
    hist_lock = threading.Lock()
    stop = threading.Event()
    reads = [0]

    def age_one_grace_period(v: Version) -> None:
        v.age += 1
        if v.age < PIPELINE:
            domain.retire(v, age_one_grace_period)  # one more grace period
        else:
            v.freed = True
            v.free_count += 1

    def reader() -> None:
        local: Counter[int] = Counter()
        n = 0
        with domain.registered():
            while not stop.is_set():
                v = box[0]
                for _ in range(20):  # a read-side section of some length
                    if v.freed:
                        local[PIPELINE] += 1
                local[v.age] += 1
                n += 1
                domain.quiescent()
                if n % 1000 == 0:
                    with domain.detached():
                        pass
        with hist_lock:
            histogram.update(local)
            reads[0] += n

    def writer() -> None:
        try:
            with domain.registered():
                deadline = time.monotonic() + seconds
                k = 0
                while time.monotonic() < deadline:
                    k += 1
                    new = Version(k)
                    versions.append(new)
                    old, box[0] = box[0], new
                    domain.retire(old, age_one_grace_period)
                    domain.quiescent()
                    if k % 32 == 0:
                        domain.poll()
        finally:
            stop.set()

    run_threads(writer, *([reader] * READERS), timeout=seconds + 60)
    # Unlink the last version too, then let every pipeline run out.
    with domain.registered():
        last, box[0] = box[0], Version(-1)
        domain.retire(last, age_one_grace_period)
    for _ in range(PIPELINE + 2):
        assert domain.barrier(timeout=30)
    return histogram, versions, reads[0]


@pytest.mark.timeout(SECONDS * 2 + 120)
def test_torture_ages_stay_within_the_bound(scan: str) -> None:
    domain = qsbr.Domain(scan=scan)
    histogram, versions, reads = torture(domain, SECONDS)
    assert reads > 0 and len(versions) > 10
    assert set(histogram) == {0}, f"readers saw versions older than allowed: {dict(histogram)}"
    assert sum(histogram.values()) == reads
    counts = Counter(v.free_count for v in versions)
    assert counts == Counter({1: len(versions)}), f"free counts: {dict(counts)}"
    assert domain.pending == 0
    domain.close()


@pytest.mark.timeout(120)
def test_torture_catches_a_domain_that_ignores_readers() -> None:
    """The bound can fail: a broken domain shows readers aged versions."""
    histogram: Counter[Any] = Counter()
    for _ in range(5):
        histogram, _, _ = torture(domain_that_ignores_readers(deferred_limit=1), 1.0)
        if set(histogram) - {0}:
            break
    assert set(histogram) - {0}, f"the torture test missed a broken domain: {dict(histogram)}"
