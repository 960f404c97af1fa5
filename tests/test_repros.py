"""The reproducers in ../shared/repros/ (a user's trial of the library), one
test each, named after the script. Each failed before the fix it names.
(fork_child_runs_parent_releases.py is in test_fork.py,
forgot_quiescent_memory.py in test_bounded.py, http_server_hot_swap.py in
test_servers.py; mmap_exports_race.py and memoryview_exports_race.py show
CPython 3.13t issues without qsbr: test_mmap_slicing_avoids_the_export_race
checks the workaround docs/guide.md gives.)"""

from __future__ import annotations

import mmap
import sys
import threading

import pytest

import qsbr
from helpers import STEP_TIMEOUT, run_threads


class Res:
    def __init__(self, v: int) -> None:
        self.v, self.closed = v, False

    def close(self) -> None:
        self.closed = True


def test_cell_unregistered_reader_unprotected() -> None:
    """A thread that never registered read cell.value; the old value was
    closed under it, silently. In debug mode the read raises; in a read
    section it is protected."""
    d = qsbr.Domain(debug=True)
    cell = qsbr.Cell(Res(0), Res.close, domain=d)
    errors: list[BaseException] = []

    def unprotected() -> None:
        try:
            cell.value  # noqa: B018 - the read is the test
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    run_threads(unprotected)
    assert len(errors) == 1 and isinstance(errors[0], qsbr.UnprotectedReadError)
    assert "with domain.attached()" in str(errors[0])

    got, go = threading.Event(), threading.Event()
    seen: list[bool] = []

    def protected() -> None:  # the one-line fix: a read section
        with d.attached():
            r = cell.value
            got.set()
            assert go.wait(STEP_TIMEOUT)
            seen.append(r.closed)

    t = threading.Thread(target=protected)
    t.start()
    assert got.wait(STEP_TIMEOUT)
    cell.set(Res(1))  # an unregistered writer, as the docs allow
    go.set()
    t.join(STEP_TIMEOUT)
    assert seen == [False]  # not closed mid-request
    assert d.barrier(timeout=STEP_TIMEOUT)
    d.close()


def test_retire_hint_wrong() -> None:
    """The TypeError suggested retire(obj, obj.close), which calls
    obj.close(obj). The hint now works as written."""
    d = qsbr.Domain()

    class Conn:
        closes = 0

        def close(self) -> None:
            self.closes += 1

    c = Conn()
    with d.registered():
        with pytest.raises(TypeError) as info:
            d.retire(c, "close")  # type: ignore[arg-type]
        hint = str(info.value)
        assert "retire(obj, type(obj).close)" in hint and "obj.close)" not in hint.replace("(obj).close", "")
        d.retire(c, type(c).close)  # do what the hint says
        assert d.barrier(timeout=STEP_TIMEOUT)
    assert c.closes == 1 and d.stats().release_errors == 0
    d.close()


def test_double_retire_silent() -> None:
    """Retiring one object twice was accepted and its release ran twice. In
    debug mode the second retirement raises, directly or through a Cell."""

    class R:
        def __init__(self) -> None:
            self.n = 0

        def close(self) -> None:
            self.n += 1

    d = qsbr.Domain(debug=True)
    r = R()
    with d.registered():
        d.retire(r, R.close)
        with pytest.raises(ValueError, match="already waiting to be released"):
            d.retire(r, R.close)
        assert d.barrier(timeout=STEP_TIMEOUT)
    assert r.n == 1
    holder = threading.Thread  # the Cell half runs with a reader holding releases back
    stop = threading.Event()
    ready = threading.Event()

    def reader() -> None:
        with d.registered():
            ready.set()
            stop.wait(STEP_TIMEOUT)

    t = holder(target=reader)
    t.start()
    assert ready.wait(STEP_TIMEOUT)
    c = qsbr.Cell(R(), R.close, domain=d)
    a = R()
    c.set(a)
    c.set(R())
    c.set(a)
    with pytest.raises(ValueError, match="already waiting to be released"):
        c.set(R())
    stop.set()
    t.join(STEP_TIMEOUT)
    assert d.barrier(timeout=STEP_TIMEOUT)
    assert a.n == 1
    d.close()


def test_cell_value_after_close() -> None:
    """cell.value after close() raised a bare AttributeError."""
    c = qsbr.Cell(1)
    c.close()
    with pytest.raises(ValueError, match="Cell is closed"):
        c.get()
    with pytest.raises(ValueError, match="Cell is closed"):
        c.value  # noqa: B018 - the read is the test
    assert isinstance(c, qsbr.Cell) and "closed" in repr(c)


@pytest.mark.skipif(
    not hasattr(sys, "_is_gil_enabled") or sys._is_gil_enabled(), reason="the race is free-threaded only"
)
def test_mmap_slicing_avoids_the_export_race() -> None:
    """docs/guide.md tells 3.13t users to slice an mmap (mm[a:b]) rather than
    struct.unpack_from() on it from many threads: slicing exports no buffer,
    so close() never finds "exported pointers" left by the race."""
    fails = 0
    for _ in range(10):
        mm = mmap.mmap(-1, 1 << 16)
        start = threading.Barrier(4, timeout=STEP_TIMEOUT)

        def rd(mm: mmap.mmap = mm, start: threading.Barrier = start) -> None:
            start.wait()
            for i in range(5000):
                int.from_bytes(mm[4 * (i % 1000) : 4 * (i % 1000) + 4], "little")

        run_threads(rd, rd, rd, rd, timeout=60)
        try:
            mm.close()
        except BufferError:
            fails += 1
    assert fails == 0
