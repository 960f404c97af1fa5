"""SharedArray: a growable typed array that readers index without a lock
(docs/api.md, "qsbr.SharedArray"). Every test runs under both rd_seq
strategies."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from typing import Any

import pytest

import qsbr
from helpers import Worker, read, run_threads
from qsbr.pool_pages import PageSet, byte_view, poison

#: Run every test here with the domain in debug mode too (conftest.py).
DEBUG_TOO = True


def test_shared_array_basics(domain: qsbr.Domain) -> None:
    a = qsbr.SharedArray("q", domain=domain)
    assert len(a) == 0 and list(a) == []
    for i in range(20):
        a.append(i)
    a.extend(range(20, 50))
    assert len(a) == 50 and a[0] == 0 and a[-1] == 49 and a[10:13] == [10, 11, 12]
    assert list(a) == list(range(50)) and a.tolist() == list(range(50))
    v = a.view()
    assert v.readonly and v.tolist() == list(range(50))
    with pytest.raises(IndexError):
        a[50]
    with pytest.raises(TypeError):
        a.extend([1, "x"])
    with pytest.raises(TypeError):
        a.append("x")
    assert len(a) == 50  # a bad item changed nothing
    with pytest.raises(OverflowError):
        qsbr.SharedArray("b", domain=domain).append(1000)
    for bad in ("u", "z", "dd"):
        with pytest.raises(ValueError, match="typecode must be one of"):
            qsbr.SharedArray(bad)
    with pytest.raises(TypeError, match="typecode must be a str"):
        qsbr.SharedArray(3)  # type: ignore[arg-type]
    other = qsbr.BufferPool(domain=qsbr.Domain(stall_timeout=None))
    with pytest.raises(ValueError, match="another domain"):
        qsbr.SharedArray("d", pool=other, domain=domain)
    a.close()
    with pytest.raises(ValueError, match="closed"):
        a.append(1)
    assert len(a) == 0


def test_shared_array_resize_retires_old_storage_to_the_pool(domain: qsbr.Domain, worker: Worker) -> None:
    pool = qsbr.BufferPool(domain=domain, debug=True)
    a = qsbr.SharedArray("d", pool=pool)
    a.extend(float(i) for i in range(8))  # fills the first storage exactly
    worker.call(domain.register)
    old_view = worker.call(a.view)  # a reader holds the 8-item storage
    a.append(8.0)  # resize: new storage, old one back to the pool
    assert read(domain, lambda: (len(a), a[8])) == (9, 8.0)
    waiting = sum(c.waiting for c in pool.stats().classes.values())
    assert waiting == 1
    for _ in range(50):  # lots of pool traffic: the old block must not be reused
        pool.release(pool.acquire(64))
    assert old_view.tolist() == [float(i) for i in range(8)]
    domain.advance()
    worker.call(domain.quiescent)
    domain.poll()  # rd_seq catches up: the old storage is safe now
    pool.release(pool.acquire(64))  # reused (and poisoned first)
    assert old_view.tolist() != [float(i) for i in range(8)]
    worker.call(domain.unregister)


def test_shared_array_readers_see_consistent_versions(domain: qsbr.Domain) -> None:
    pool = qsbr.BufferPool(domain=domain, debug=True)  # reuse under a reader shows poison
    a = qsbr.SharedArray("q", pool=pool)
    stop = threading.Event()

    def reader() -> None:
        with domain.registered():
            while not stop.is_set():
                v = a.view()
                n = len(v)
                if n:
                    assert v[n - 1] == n - 1 and v[n // 2] == n // 2, f"inconsistent view of {n} items"
                    assert a[n - 1] == n - 1, "a[i] != i"
                del v
                domain.quiescent()

    def writer() -> None:
        try:
            for i in range(20000):
                if i % 100 == 0:
                    a.extend(range(i, i + 100))
                if i % 1000 == 0:
                    time.sleep(0)
        finally:
            stop.set()

    run_threads(reader, reader, writer, timeout=60)
    assert read(domain, a.tolist) == list(range(20000))


class EagerPages(PageSet):
    """Broken on purpose: a released block is free at once, no grace period
    (and poisoned at once, as a debug pool does when a grace period ends)."""

    def retire(self, block: Any) -> None:
        super().retire(block)
        self.waiting[block.size].remove(block)
        byte_view(block.page.mem, block.offset, block.offset + block.size)[:] = poison(block.size)
        block.page.out -= 1
        self.free[block.size].append(block)


class EagerPool(qsbr.BufferPool):
    _pages_class = EagerPages


def test_the_resize_check_catches_a_pool_without_grace_periods(domain: qsbr.Domain, worker: Worker) -> None:
    """The same steps as the resize test above, with a pool that recycles at
    once: the reader's view of the old storage is overwritten under it."""
    pool = EagerPool(domain=domain)
    a = qsbr.SharedArray("d", pool=pool)
    a.extend(float(i) for i in range(8))
    worker.call(domain.register)
    old_view = worker.call(a.view)
    a.append(8.0)  # resize: the old storage goes back to the pool...
    assert old_view.tolist() != [float(i) for i in range(8)]  # ...and is poisoned under the reader
    worker.call(domain.unregister)


RACE = """
import sys, threading, time
import qsbr
d = qsbr.Domain()
a = qsbr.SharedArray("q", domain=d)
a.append(0)
stop = threading.Event()
mode = sys.argv[1]
def reader():
    with d.registered():
        while not stop.is_set():
            if mode == "view":
                v = a.view()
                del v
            else:
                for _ in a:
                    break
            d.quiescent()
ts = [threading.Thread(target=reader) for _ in range(2)]
for t in ts:
    t.start()
end = time.monotonic() + float(sys.argv[2])
i = 1
while time.monotonic() < end:
    for _ in range(1000):
        a.append(i)
        i += 1
stop.set()
for t in ts:
    t.join()
print("appended", len(a))
"""


@pytest.mark.skipif(
    not hasattr(sys, "_is_gil_enabled") or sys._is_gil_enabled(), reason="the race is free-threaded only"
)
@pytest.mark.parametrize("mode", ["view", "iter"])
@pytest.mark.timeout(120)
def test_readers_views_race_no_export_count(mode: str) -> None:
    """shared/repros/pipeline/sharedarray_view_race.py, for 10 s: every
    reader exported one shared bytearray, whose export count 3.13t does not
    update atomically ("SystemError: deallocated bytearray object has
    exported buffers"). The storage keeps no export count now."""
    out = subprocess.run(
        [sys.executable, "-c", RACE, mode, "10"], capture_output=True, text=True, timeout=100
    )
    assert out.returncode == 0, out.stderr
    assert "exported buffers" not in out.stderr and "SystemError" not in out.stderr, out.stderr[-2000:]
    assert "appended" in out.stdout
