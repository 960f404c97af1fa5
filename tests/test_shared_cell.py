"""SharedCell: publish/read across processes, the arena's reuse after grace
periods, values in segments of their own, a writer dying mid-publish, and
bad input. The SIGKILL stress test is test_shared_stress.py."""

from __future__ import annotations

import os
import threading
import time
import zlib
from collections.abc import Callable, Iterator

import pytest
from processes import shm_names

import qsbr
from qsbr import shared_cell as scm
from qsbr import shm

pytestmark = pytest.mark.skipif(qsbr.implementation != "native", reason="SharedCell needs the native kernel")


@pytest.fixture
def make_cell() -> Iterator[Callable[..., qsbr.SharedCell]]:
    made: list[qsbr.SharedCell] = []

    def make(**kwargs: object) -> qsbr.SharedCell:
        c = qsbr.SharedCell(create=True, **kwargs)  # type: ignore[arg-type]
        made.append(c)
        return c

    yield make
    for c in made:
        try:
            c.domain.close(timeout=5)
        except TimeoutError:
            pass
        c.close()
        c.unlink()
        assert not shm_names(c.name), f"left in /dev/shm: {shm_names(c.name)}"


def test_bad_input(make_cell) -> None:
    with pytest.raises(ValueError, match="capacity"):
        qsbr.SharedCell(create=True, capacity=10)
    with pytest.raises(TypeError, match="capacity"):
        qsbr.SharedCell(create=True, capacity="big")  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError):
        qsbr.SharedCell(shm.new_name("qsbr_test_missing_"))
    with pytest.raises(ValueError, match="name is required"):
        qsbr.SharedCell()
    c = make_cell(capacity=4096)
    with pytest.raises(TypeError, match="bytes-like"):
        c.publish(12)
    with pytest.raises(TypeError, match="bytes-like"):
        c.publish("text")
    with pytest.raises(ValueError, match="not a qsbr SharedDomain"):
        qsbr.SharedDomain(c.name)  # a cell's segment is not a domain


def test_publish_and_read(make_cell) -> None:
    c = make_cell(capacity=4096)
    h = c.domain.register()
    assert c.version == 0 and bytes(c.read()) == b""
    assert c.publish(b"one") == 1 and bytes(c.read()) == b"one" and c.version == 1
    view = c.read()
    assert view.readonly
    with pytest.raises(TypeError):
        view[0] = 0  # type: ignore[index]
    # Each read is the caller's own view: releasing one leaves the others.
    first = c.read()
    with c.read() as second:
        assert second == first and second is not first
    assert bytes(first) == b"one"
    assert c.publish(bytearray(b"two")) == 2 and bytes(c.read()) == b"two"
    assert c.publish(memoryview(b"x" * 100)[::2]) == 3 and bytes(c.read()) == b"x" * 50
    h.quiescent()
    c.close()
    with pytest.raises(ValueError, match="closed"):
        c.publish(b"more")
    with pytest.raises(ValueError, match="closed"):
        c.read()


def test_the_arena_is_reused_and_stays_bounded(make_cell) -> None:
    c = make_cell(capacity=8192)
    h = c.domain.register()
    for i in range(2000):
        # Up to a third of the arena: always fits beside the current value.
        data = bytes([i % 251]) * (i * 37 % (8192 // 3 - scm.BLOCK * 2))
        c.publish(data)
        assert bytes(c.read()) == data
        h.quiescent()
    s = c.stats()
    assert s["publishes"] == 2000 and s["external"] == 0 and s["used"] <= 8192


def test_a_reader_holding_a_value_keeps_its_block_from_reuse(make_cell) -> None:
    """The writer fills the arena while a reader holds the first value: the
    publish waits (it does not overwrite), and goes on once the reader is
    quiescent; the reader's view was intact all along."""
    c = make_cell(capacity=1024)
    held = threading.Event()
    go = threading.Event()
    seen: list[bytes] = []

    def reader() -> None:
        with c.domain.registered() as h:
            view = c.read()
            seen.append(bytes(view))
            held.set()
            go.wait(10)
            seen.append(bytes(view))  # still the same bytes
            h.quiescent()
            time.sleep(0.2)

    c.publish(b"A" * 300)
    t = threading.Thread(target=reader)
    t.start()
    try:
        assert held.wait(10)
        versions: list[int] = []
        writer = threading.Thread(target=lambda: versions.extend(c.publish(b"B" * 300) for _ in range(3)))
        writer.start()
        time.sleep(0.2)
        assert len(versions) < 3  # waiting: the arena holds A until the reader passes
        go.set()
        writer.join(10)
        assert versions == [2, 3, 4]
        assert c.stats()["full_waits"] >= 1
    finally:
        go.set()
        t.join(10)
    assert seen == [b"A" * 300, b"A" * 300]


def test_a_value_larger_than_the_arena_gets_its_own_segment(make_cell) -> None:
    c = make_cell(capacity=4096)
    h = c.domain.register()
    big = os.urandom(100_001)  # not a whole number of words
    c.publish(big)
    assert bytes(c.read()) == big and c.stats()["external"] == 1
    own = [n for n in shm_names(c.name) if n.startswith(c.name[:40] + "_v")]
    assert len(own) == 1
    view = c.read()
    c.publish(b"small")
    h.quiescent()  # the old value's segment is unlinked only after this
    assert c.domain.barrier(timeout=10)
    assert not [n for n in shm_names(c.name) if n.startswith(c.name[:40] + "_v")]
    del view


def test_readers_in_other_processes_see_whole_values(make_cell, children) -> None:
    c = make_cell(capacity=1 << 16)
    c.publish(b"")
    kids = [children() for _ in range(2)]
    loop = (
        "def check(n):\n"
        "    bad = 0\n"
        "    for _ in range(n):\n"
        "        v = c.read()\n"
        "        if len(v) >= 4 and zlib.crc32(v[4:]) != int.from_bytes(v[:4], 'little'): bad += 1\n"
        "        h.quiescent()\n"
        "    h.detach()\n"
        "    return bad\n"
    )
    for kid in kids:
        kid.run(f"c = qsbr.SharedCell({c.name!r}); h = c.domain.register()")
        kid.run(f"exec({loop!r})")
        kid.send("out = check(3000)")
    for i in range(300):
        body = os.urandom(i * 131 % 20000)
        c.publish(zlib.crc32(body).to_bytes(4, "little") + body)
    assert [kid.answer(60) for kid in kids] == [0, 0]
    for kid in kids:
        kid.run("c.close()")


def test_a_writer_that_died_before_publishing_is_undone(make_cell, monkeypatch) -> None:
    """A publish interrupted after its value's own segment was made: the next
    publish finds the journal, unlinks the segment, rolls the tail back."""
    c = make_cell(capacity=4096)
    h = c.domain.register()
    c.publish(b"before")
    real_create = shm.create

    def die(name: str, size: int):  # the writer dies right after making the segment
        real_create(name, size).close()
        raise KeyboardInterrupt

    monkeypatch.setattr(shm, "create", die)
    with pytest.raises(KeyboardInterrupt):
        c.publish(os.urandom(10_000))
    monkeypatch.setattr(shm, "create", real_create)
    assert len([n for n in shm_names(c.name) if "_v" in n[len(c.name) :]]) == 1
    assert bytes(c.read()) == b"before" and c.version == 1  # readers never saw it
    assert c.publish(b"after") == 2
    assert bytes(c.read()) == b"after" and c.stats()["recovered"] == 1
    assert not [n for n in shm_names(c.name) if "_v" in n[len(c.name) :]]
    h.quiescent()


def test_a_writer_that_died_after_publishing_is_finished(make_cell, monkeypatch) -> None:
    """A publish interrupted after the value was made current, before the old
    value was retired: the next publish retires it (once), and the ring's
    space comes back."""
    c = make_cell(capacity=4096)
    h = c.domain.register()
    c.publish(b"old" * 100)

    def die(self, offset):
        raise KeyboardInterrupt

    monkeypatch.setattr(scm.SharedCell, "_retire_block_locked", die)
    with pytest.raises(KeyboardInterrupt):
        c.publish(b"new" * 100)
    monkeypatch.undo()
    assert bytes(c.read()) == b"new" * 100
    for i in range(200):  # the arena keeps turning: the old block was retired
        c.publish(bytes([i]) * 500)
        h.quiescent()
    assert c.stats()["recovered"] == 1


def test_a_cell_outlives_its_creator(children) -> None:
    maker = children()
    name = maker.run(
        "c = qsbr.SharedCell(create=True, capacity=4096); c.publish(os.urandom(50000)); out = c.name"
    )
    maker.kill()
    maker.wait()
    c = qsbr.SharedCell(name)
    try:
        c.domain.register()
        assert len(c.read()) == 50000
        c.publish(b"next")
        assert bytes(c.read()) == b"next"
    finally:
        c.close()
        c.unlink()
    assert not shm_names(name)


def test_threads_of_one_process_read_the_same_value_at_once(make_cell) -> None:
    """Views are views of a CellBlock (one managed buffer each): threads that
    read, release and drop views of the same value at once share no export
    counts (3.13t updates a memoryview's without atomics)."""
    c = make_cell(capacity=1 << 16)
    c.publish(b"a" * 1000)
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader() -> None:
        try:
            with c.domain.registered() as h:
                while not stop.is_set():
                    with c.read() as v:
                        assert len(v) == 1000 and v[0] in (ord("a"), ord("b"))
                    keep = c.read()
                    assert bytes(keep[:1]) in (b"a", b"b")
                    del keep
                    h.quiescent()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        for i in range(300):
            c.publish((b"a" if i % 2 else b"b") * 1000)
            time.sleep(0.0005)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert not errors and not any(t.is_alive() for t in threads)


def test_reads_leak_nothing(make_cell) -> None:
    """The C read path: a view per call, a cached block per value; nothing
    kept once the views are gone (references and traced memory flat)."""
    import gc
    import tracemalloc

    c = make_cell(capacity=1 << 16)
    h = c.domain.register()
    big = os.urandom(100_000)  # a value in a segment of its own: the Python path

    def loop(n: int) -> None:
        for i in range(n):
            if i % 1000 == 0:
                c.publish(big if i % 2000 else b"v" * (i % 900))
            with c.read() as v:
                len(v)
            c.read()
            h.quiescent()

    loop(5000)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    loop(20_000)
    gc.collect()
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    grown = sum(s.size_diff for s in after.compare_to(before, "filename") if s.size_diff > 0)
    assert grown < 64 * 1024, grown  # a leaked view or block per read would be megabytes
