"""Cell, BufferPool, SharedArray, ThreadPoolExecutor."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

import qsbr
from conftest import STEP_TIMEOUT, Worker, wait_until


class Resource:
    def __init__(self, k: int) -> None:
        self.k = k
        self.closes = 0

    def use(self) -> int:
        assert self.closes == 0, f"resource {self.k} used after close()"
        return self.k

    def close(self) -> None:
        self.closes += 1


@pytest.fixture
def dom() -> Any:
    d = qsbr.Domain(stall_timeout=None)
    yield d
    d.close()


# -- Cell -----------------------------------------------------------------------


def test_cell_reads_and_retires_after_readers(dom: qsbr.Domain, worker: Worker) -> None:
    first, second = Resource(1), Resource(2)
    cell = qsbr.Cell(first, Resource.close, domain=dom)
    assert cell.value is first and cell.get() is first and cell.domain is dom
    worker.call(dom.register)
    held = worker.call(lambda: cell.value)  # the reader holds `first`
    cell.set(second)  # from an unregistered thread
    assert cell.value is second
    assert not dom.poll() and first.closes == 0
    assert held.use() == 1
    worker.call(dom.quiescent)
    assert dom.barrier(timeout=STEP_TIMEOUT)
    assert first.closes == 1 and second.closes == 0
    worker.call(dom.unregister)


def test_cell_set_same_value_retires_nothing(dom: qsbr.Domain) -> None:
    r = Resource(1)
    cell = qsbr.Cell(r, Resource.close, domain=dom)
    cell.set(r)
    assert dom.barrier(timeout=STEP_TIMEOUT)
    assert r.closes == 0


def test_cell_exchange_and_compare_and_set(dom: qsbr.Domain) -> None:
    a, b, c = Resource(1), Resource(2), Resource(3)
    cell = qsbr.Cell(a, Resource.close, domain=dom)
    assert cell.exchange(b) is a  # handed back, not retired
    assert not cell.compare_and_set(a, c)  # identity: a is no longer there
    assert cell.value is b
    assert cell.compare_and_set(b, c)
    assert cell.value is c
    assert dom.barrier(timeout=STEP_TIMEOUT)
    assert (a.closes, b.closes, c.closes) == (0, 1, 0)


def test_cell_tells_the_domain_what_a_release_frees(dom: qsbr.Domain, worker: Worker) -> None:
    worker.call(dom.register)  # holds releases back
    cell = qsbr.Cell(Resource(1), Resource.close, domain=dom, size=lambda r: 1000 * r.k)
    cell.set(Resource(2))
    cell.set(Resource(3))
    assert dom.pending_bytes == 1000 + 2000
    worker.call(dom.unregister)
    assert dom.barrier(timeout=STEP_TIMEOUT)
    assert dom.pending_bytes == 0
    with pytest.raises(TypeError, match="size must be callable"):
        qsbr.Cell(1, size=5)  # type: ignore[arg-type]


def test_cell_misuse(dom: qsbr.Domain) -> None:
    cell = qsbr.Cell(1, domain=dom)
    with pytest.raises(AttributeError, match="use cell.set"):
        cell.value = 2  # type: ignore[misc]
    with pytest.raises(TypeError, match="release must be callable"):
        qsbr.Cell(1, 42)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="domain must be a qsbr.Domain"):
        qsbr.Cell(1, domain="d")  # type: ignore[arg-type]
    assert qsbr.Cell[int](5, domain=dom).value == 5


def test_cell_close(dom: qsbr.Domain) -> None:
    r = Resource(1)
    cell = qsbr.Cell(r, Resource.close, domain=dom)
    cell.close()
    cell.close()
    assert dom.barrier(timeout=STEP_TIMEOUT)
    assert r.closes == 1
    for op in (cell.get, lambda: cell.set(Resource(2)), lambda: cell.exchange(3)):
        with pytest.raises(ValueError, match="closed"):
            op()
    assert "closed" in repr(cell)


def test_cell_under_concurrent_readers_and_writers(dom: qsbr.Domain) -> None:
    made = [Resource(0)]
    cell = qsbr.Cell(made[0], Resource.close, domain=dom)
    stop = threading.Event()
    errors: list[BaseException] = []
    made_lock = threading.Lock()

    def reader() -> None:
        try:
            with dom.registered():
                n = 0
                while not stop.is_set():
                    r = cell.value
                    r.use()
                    r.use()
                    n += 1
                    if n % 8 == 0:
                        dom.quiescent()
        except BaseException as exc:
            errors.append(exc)

    def writer(base: int, registered: bool) -> None:
        try:
            if registered:
                dom.register()
            for k in range(300):
                r = Resource(base + k)
                with made_lock:
                    made.append(r)
                cell.set(r)
                if registered:
                    dom.quiescent()
            if registered:
                dom.unregister()
        except BaseException as exc:
            errors.append(exc)

    readers = [threading.Thread(target=reader) for _ in range(3)]
    writers = [threading.Thread(target=writer, args=(1000 * (i + 1), i == 0)) for i in range(2)]
    for t in readers + writers:
        t.start()
    for t in writers:
        t.join(timeout=60)
    stop.set()
    for t in readers:
        t.join(timeout=STEP_TIMEOUT)
    assert not errors, errors[:3]
    assert dom.barrier(timeout=STEP_TIMEOUT)
    current = cell.value
    assert [r.closes for r in made if r is not current] == [1] * (len(made) - 1)
    assert current.closes == 0


# -- BufferPool --------------------------------------------------------------------


def test_pool_acquire_sizes_and_errors(dom: qsbr.Domain) -> None:
    pool = qsbr.BufferPool(domain=dom)
    v = pool.acquire(100)
    assert len(v) == 100 and not v.readonly
    st = pool.stats().classes
    assert st[256].in_use == 1 and st[64].in_use == 0
    assert pool.stats()["pages"] == pool.stats().pages == 1
    assert set(pool.stats().as_dict()["classes"]) == {64, 256, 1024, 4096, 16384, 65536}
    assert len(pool.acquire(65536)) == 65536
    with pytest.raises(TypeError, match="int number of bytes"):
        pool.acquire(1.5)  # type: ignore[arg-type]
    for bad in (0, -1, 65537):
        with pytest.raises(ValueError, match="sizes must be in 1..65536"):
            pool.acquire(bad)
    with pytest.raises(ValueError, match="released already, or it did not come from this pool"):
        pool.release(memoryview(bytearray(100)))
    with pytest.raises(ValueError, match="not a slice"):
        pool.release(v[:10])
    pool.release(v)
    with pytest.raises(ValueError, match="released already"):
        pool.release(v)
    for kwargs in ({"size_classes": ()}, {"size_classes": (0,)}, {"page_size": 0}, {"max_bytes": 10}):
        with pytest.raises(ValueError):
            qsbr.BufferPool(**kwargs)  # type: ignore[arg-type]
    pool.close()
    with pytest.raises(ValueError, match="closed"):
        pool.acquire(10)


def test_pool_reuses_a_block_only_after_a_grace_period(dom: qsbr.Domain, worker: Worker) -> None:
    pool = qsbr.BufferPool((256,), page_size=1024, max_bytes=2048, debug=True, domain=dom)
    worker.call(dom.register)  # a reader that holds the view below
    v = pool.acquire(256)
    v[:] = b"\x07" * 256
    reader_view = worker.call(lambda: v[:])  # the reader's own slice of the block
    pool.release(v)
    others = [pool.acquire(256) for _ in range(7)]  # the other 7 blocks of 2 pages
    for o in others:
        o[:] = b"\xff" * 256
    assert bytes(reader_view) == b"\x07" * 256  # untouched: not reused
    with pytest.raises(MemoryError, match="max_bytes=2,048"):
        pool.acquire(256)  # only the waiting block is left, and it is not safe
    assert pool.stats().classes[256].waiting == 1
    worker.call(dom.quiescent)  # the reader is done with it
    again = pool.acquire(256)
    assert bytes(reader_view) == bytes([qsbr.buffer_pool.POISON]) * 256  # same block, poisoned when safe
    assert bytes(again) == bytes(reader_view)
    worker.call(dom.unregister)


def test_pool_page_changes_class_only_after_a_grace_period(dom: qsbr.Domain, worker: Worker) -> None:
    pool = qsbr.BufferPool((256, 512), page_size=1024, max_bytes=1024, domain=dom)
    worker.call(dom.register)
    v = pool.acquire(200)
    pool.release(v)
    with pytest.raises(MemoryError):
        pool.acquire(500)  # the one page still serves 256 and is not safe yet
    worker.call(dom.quiescent)  # after that acquire's poll advanced to the goal
    w = pool.acquire(500)  # now the page may be re-carved into 512-byte blocks
    assert len(w) == 500
    st = pool.stats().classes
    assert (st[512].in_use, st[256].free, st[256].waiting) == (1, 0, 0)
    worker.call(dom.unregister)


def test_pool_under_threads_never_hands_out_a_block_in_use(dom: qsbr.Domain) -> None:
    """Producers fill blocks with a tag and hand views to consumers through
    a queue; consumers check the tag, release, quiesce. A block reused under
    a consumer would show another tag."""
    import queue

    pool = qsbr.BufferPool((64, 256), page_size=4096, domain=dom)
    q: queue.Queue[tuple[int, memoryview] | None] = queue.Queue(maxsize=64)
    errors: list[str] = []

    def producer(base: int) -> None:
        for k in range(2000):
            tag = (base + k) & 0xFF
            v = pool.acquire(64 if k % 2 else 200)
            v[:] = bytes([tag]) * len(v)
            q.put((tag, v))

    def consumer() -> None:
        with dom.registered():
            while True:
                item = q.get(timeout=STEP_TIMEOUT)
                if item is None:
                    return
                tag, v = item
                if bytes(v) != bytes([tag]) * len(v):
                    errors.append(f"block changed under its reader (tag {tag})")
                pool.release(v)
                # Still ours until the quiescent state: check once more.
                if bytes(v) != bytes([tag]) * len(v):
                    errors.append(f"block reused before a grace period (tag {tag})")
                dom.quiescent()

    producers = [threading.Thread(target=producer, args=(i * 77,)) for i in range(2)]
    consumers = [threading.Thread(target=consumer) for _ in range(2)]
    for t in producers + consumers:
        t.start()
    for t in producers:
        t.join(timeout=60)
    for _ in consumers:
        q.put(None)
    for t in consumers:
        t.join(timeout=60)
    assert not errors, errors[:3]
    st = pool.stats()
    assert sum(c.in_use for c in st.classes.values()) == 0


# -- SharedArray ---------------------------------------------------------------------


def test_shared_array_basics(dom: qsbr.Domain) -> None:
    a = qsbr.SharedArray("q", domain=dom)
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
        qsbr.SharedArray("b", domain=dom).append(1000)
    for bad in ("u", "z", "dd"):
        with pytest.raises(ValueError, match="typecode must be one of"):
            qsbr.SharedArray(bad)
    with pytest.raises(TypeError, match="typecode must be a str"):
        qsbr.SharedArray(3)  # type: ignore[arg-type]
    other = qsbr.BufferPool(domain=qsbr.Domain(stall_timeout=None))
    with pytest.raises(ValueError, match="another domain"):
        qsbr.SharedArray("d", pool=other, domain=dom)
    a.close()
    with pytest.raises(ValueError, match="closed"):
        a.append(1)
    assert len(a) == 0


def test_shared_array_resize_retires_old_storage_to_the_pool(dom: qsbr.Domain, worker: Worker) -> None:
    pool = qsbr.BufferPool(domain=dom, debug=True)
    a = qsbr.SharedArray("d", pool=pool)
    a.extend(float(i) for i in range(8))  # fills the first storage exactly
    worker.call(dom.register)
    old_view = worker.call(a.view)  # a reader holds the 8-item storage
    a.append(8.0)  # resize: new storage, old one back to the pool
    assert len(a) == 9 and a[8] == 8.0
    waiting = sum(c.waiting for c in pool.stats().classes.values())
    assert waiting == 1
    for _ in range(50):  # lots of pool traffic: the old block must not be reused
        pool.release(pool.acquire(64))
    assert old_view.tolist() == [float(i) for i in range(8)]
    dom.advance()
    worker.call(dom.quiescent)
    dom.poll()  # rd_seq catches up: the old storage is safe now
    pool.release(pool.acquire(64))  # reused (and poisoned first)
    assert old_view.tolist() != [float(i) for i in range(8)]
    worker.call(dom.unregister)


def test_shared_array_readers_see_consistent_versions(dom: qsbr.Domain) -> None:
    pool = qsbr.BufferPool(domain=dom, debug=True)  # reuse under a reader shows poison
    a = qsbr.SharedArray("q", pool=pool)
    stop = threading.Event()
    errors: list[str] = []

    def reader() -> None:
        with dom.registered():
            while not stop.is_set():
                v = a.view()
                n = len(v)
                if n and (v[n - 1] != n - 1 or v[n // 2] != n // 2):
                    errors.append(f"inconsistent view of {n} items")
                if n and a[n - 1] != n - 1:
                    errors.append("a[i] != i")
                del v
                dom.quiescent()

    readers = [threading.Thread(target=reader) for _ in range(2)]
    for t in readers:
        t.start()
    for i in range(20000):
        if i % 100 == 0:
            a.extend(range(i, i + 100))
        if i % 1000 == 0:
            time.sleep(0)
    stop.set()
    for t in readers:
        t.join(timeout=STEP_TIMEOUT)
    assert not errors, errors[:3]
    assert a.tolist() == list(range(20000))


# -- ThreadPoolExecutor ------------------------------------------------------------------


def test_executor_workers_are_attached_only_while_running(dom: qsbr.Domain) -> None:
    inside = threading.Event()
    go_on = threading.Event()
    seen: list[int] = []

    def init(x: int) -> None:
        seen.append(x)

    with qsbr.ThreadPoolExecutor(2, domain=dom, initializer=init, initargs=(7,)) as ex:
        assert ex.domain is dom
        assert list(ex.map(lambda x: x * 2, range(10))) == list(range(0, 20, 2))
        assert wait_until(lambda: dom.stats().threads >= 1)
        assert dom.stats().attached == 0  # idle workers are detached

        def task() -> bool:
            inside.set()
            return go_on.wait(STEP_TIMEOUT) and dom.is_registered()

        fut = ex.submit(task)
        assert inside.wait(STEP_TIMEOUT)
        assert dom.stats().attached == 1
        go_on.set()
        assert fut.result(timeout=STEP_TIMEOUT) is True
        with pytest.raises(ZeroDivisionError):
            ex.submit(lambda: 1 / 0).result(timeout=STEP_TIMEOUT)
        assert wait_until(lambda: dom.stats().attached == 0)
    assert seen and set(seen) == {7}
    assert wait_until(lambda: dom.stats().threads == 0)  # workers left when they ended


def test_executor_tasks_hold_a_swapped_value_until_they_finish(dom: qsbr.Domain) -> None:
    cell = qsbr.Cell(Resource(1), Resource.close, domain=dom)
    loaded = threading.Event()
    finish = threading.Event()

    def task() -> int:
        r = cell.value
        loaded.set()
        finish.wait(STEP_TIMEOUT)
        return r.use()  # still open: the task has not reached its quiescent state

    with qsbr.ThreadPoolExecutor(1, domain=dom) as ex:
        fut = ex.submit(task)
        assert loaded.wait(STEP_TIMEOUT)
        old = cell.value
        cell.set(Resource(2))
        assert not dom.poll() and old.closes == 0
        finish.set()
        assert fut.result(timeout=STEP_TIMEOUT) == 1
        assert dom.barrier(timeout=STEP_TIMEOUT)
        assert old.closes == 1
    with pytest.raises(TypeError):
        qsbr.ThreadPoolExecutor(1, domain=object())  # type: ignore[arg-type]


class EagerPool(qsbr.BufferPool):
    """Broken on purpose: a released block is free at once, no grace period."""

    def release(self, view: memoryview) -> None:
        super().release(view)
        with self._lock:
            for size, waiting in self._waiting.items():
                while waiting:
                    block = waiting.popleft()
                    block.page.out -= 1
                    if self._debug:
                        block.page.buf[block.offset : block.offset + block.size] = (
                            bytes([qsbr.buffer_pool.POISON]) * block.size
                        )
                    self._free[size].append(block)


def test_the_resize_check_catches_a_pool_without_grace_periods(dom: qsbr.Domain, worker: Worker) -> None:
    """The same steps as the resize test above, with a pool that recycles at
    once: the reader's view of the old storage is overwritten under it."""
    pool = EagerPool(domain=dom, debug=True)
    a = qsbr.SharedArray("d", pool=pool)
    a.extend(float(i) for i in range(8))
    worker.call(dom.register)
    old_view = worker.call(a.view)
    a.append(8.0)  # resize: the old storage goes back to the pool...
    assert old_view.tolist() != [float(i) for i in range(8)]  # ...and is poisoned under the reader
    worker.call(dom.unregister)
