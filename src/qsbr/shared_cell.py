"""SharedCell: one published bytes value, read zero-copy by many processes.

A writer (any thread of any process) publishes a value: it is copied into
the cell's arena, a ring of blocks in a shared-memory segment, and made
current by one atomic store of the block's offset. Readers (threads
registered with ``cell.domain``, a SharedDomain) load that offset and get a
read-only memoryview of the block: no copy, no lock. The block that was
current is retired with a goal; the ring's space is reused in order, only
past blocks whose goal rd_seq has reached (the grace period across all
processes). A value larger than the arena gets a segment of its own, whose
descriptor is the block; it is unlinked through the domain's
``retire_shared_memory``, so even a writer's death cannot leak it.

The ring. Blocks are laid end to end from ``head`` (the oldest block still
needed) to ``tail`` (where the next block goes), wrapping to 0 at the end
(a *pad* block fills the gap when a block does not fit before the end).
``head == tail`` means empty, so an allocation never makes them equal.
Each block starts with a 64-byte header: its size, its goal (0 while current
or being published; 1 for pads), version, value length, kind.

Invariants (the domain's D1-D5 and S1-S5 hold underneath):
  C1. Publishes are serialized by the cell's lock (a threading.Lock, then
      an OFD lock on the cell's segment: dropped by the kernel if the
      writer dies).
  C2. A block is written whole (header, then data) before ``current`` is
      stored with release order; readers load ``current`` with acquire
      order, so they see the whole block (S3's pairing).
  C3. Only head moves forward over blocks whose goal is set and <= rd_seq,
      and the current block's goal is 0: no block a reader can still reach
      is reused. A reader that loaded ``current`` is attached with
      seq <= the goal its block later gets minus 2, so rd_seq stays below
      that goal until its next quiescent state.
  C4. A publish writes a journal (the new block's offset, the old current)
      before it touches the ring, and clears it last. The next publisher
      (the lock ensures one) that finds a journal finishes or undoes the
      dead writer's publish: published -> the old block is retired if it
      was not; not published -> tail rolls back to the new block, whose
      own segment (if it made one) is unlinked. Nothing is freed twice or
      lost; readers only ever saw whole blocks (C2).
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from . import _fork, kernel, shm
from .options import check_int
from .shared_domain import SharedDomain, _native_atomics

__all__ = ["SharedCell"]

MAGIC = int.from_bytes(b"QSBRcel\x01", "little")
LAYOUT_VERSION = 1

# Header words of the cell's segment.
C_MAGIC, C_VERSION_LAYOUT, C_CAPACITY, C_READY = 0, 1, 2, 3
C_CURRENT = 8  # byte offset of the current block in the arena; -1: nothing yet
C_VERSION = 9  # the current value's version
C_HEAD, C_TAIL = 16, 17
C_JOURNAL_NEW, C_JOURNAL_OLD, C_JOURNAL_EXT = 18, 19, 20  # offset + 1; 0: none
C_PUBLISHES, C_FULL_WAITS, C_RECOVERED, C_EXTERNAL = 24, 25, 26, 27
HEADER_BYTES = 512
ARENA_AT = HEADER_BYTES

BLOCK = 64  # alignment and header size
B_SIZE, B_GOAL, B_VERSION, B_LENGTH, B_KIND, B_NAMELEN = 0, 1, 2, 3, 4, 5
INLINE, EXTERNAL, PAD = 0, 1, 2
DESCRIPTOR = BLOCK + 128  # an external value's block: header + its segment's name

LOCK_PUBLISH = 0


def _round(n: int) -> int:
    return (n + BLOCK - 1) // BLOCK * BLOCK


class SharedCell:
    """A bytes value published to many processes. See the module docstring
    and docs/api.md ("SharedCell")."""

    def __init__(self, name: str | None = None, *, create: bool = False, capacity: int = 1 << 20) -> None:
        words_type = _native_atomics()
        if not isinstance(create, bool):
            raise TypeError(f"create must be True or False, not {type(create).__name__}")
        check_int("capacity", capacity, minimum=2 * BLOCK, meaning="bytes of the arena")
        if name is None:
            if not create:
                raise ValueError("name is required to open an existing SharedCell (or pass create=True)")
            name = shm.new_name("qsbrc_")
        name = shm.check_name(name)
        if len(name.encode()) + 2 > shm.MAX_NAME:
            raise ValueError(f"SharedCell name {name!r} is too long: use at most {shm.MAX_NAME - 2} bytes")
        arena = _round(capacity)
        if create:
            mm = shm.create(name, HEADER_BYTES + arena)
        else:
            mm = shm.open_existing(name)
        try:
            words = words_type(mm)
            if create:
                words.store(C_VERSION_LAYOUT, LAYOUT_VERSION)
                words.store(C_CAPACITY, arena)
                words.store(C_CURRENT, -1)
                words.store(C_MAGIC, MAGIC)
            else:
                arena = self._check_layout(words, name, len(mm))
            self._domain = SharedDomain(name + "_d", create=create)
            if create:
                words.store(C_READY, 1)
            self._lock_fd = shm.open_lock_fd(name)
        except BaseException:
            if create:
                shm.unlink(name)
                shm.unlink(name + "_d")
            raise
        self._name = name
        self._mm = mm
        self._words = words
        self._arena = arena
        self._view = memoryview(mm).toreadonly()
        self._closed = False
        # read() is the C fast path (_shared.c, CellReader), set on the
        # instance; values in segments of their own go to _read_external.
        self._reader = kernel.CellReader(words, self._read_external, ARENA_AT)
        self.read = self._reader.read  # type: ignore[method-assign]
        self._new_process_state()
        _fork.track(self)

    def _new_process_state(self) -> None:
        self._lock = threading.Lock()  # C1, the in-process half
        # Not the publish lock: a reader must never wait for a writer (who may
        # be waiting for that reader's quiescent state).
        self._external_lock = threading.Lock()
        self._external: tuple[str, Any] | None = (
            None  # the last external value this process mapped (CellBlock)
        )

    @staticmethod
    def _check_layout(words: Any, name: str, size: int) -> int:
        deadline = time.monotonic() + 2.0
        while words.count * 8 >= HEADER_BYTES and words.load(C_MAGIC) == 0 and time.monotonic() < deadline:
            time.sleep(0.001)  # a segment just made: its creator is writing the header
        if words.count * 8 < HEADER_BYTES or words.load(C_MAGIC) != MAGIC:
            raise ValueError(f"shared-memory segment {name!r} is not a qsbr SharedCell (no qsbr magic)")
        if words.load(C_VERSION_LAYOUT) != LAYOUT_VERSION:
            raise ValueError(
                f"SharedCell {name!r} has layout version {words.load(C_VERSION_LAYOUT)}; this qsbr reads "
                f"version {LAYOUT_VERSION}"
            )
        deadline = time.monotonic() + 2.0
        while words.load(C_READY) != 1:
            if time.monotonic() > deadline:
                raise ValueError(f"SharedCell {name!r} was never initialized (its creator died making it?)")
            time.sleep(0.001)
        arena = int(words.load(C_CAPACITY))
        if arena % BLOCK or HEADER_BYTES + arena > size:
            raise ValueError(f"SharedCell {name!r} has a damaged header")
        return arena

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"version={self.version}"
        return f"<qsbr.SharedCell {self._name!r} capacity={self._arena} {state}>"

    @property
    def name(self) -> str:
        return self._name

    @property
    def domain(self) -> SharedDomain:
        """The SharedDomain its readers register with and quiesce through."""
        return self._domain

    @property
    def capacity(self) -> int:
        """Bytes of the arena."""
        return self._arena

    @property
    def version(self) -> int:
        """The current value's version (0 before the first publish)."""
        return int(self._words.load(C_VERSION))

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"SharedCell {self._name!r} is closed in this process: open it again")

    # -- blocks --------------------------------------------------------------------

    def _block(self, offset: int, field: int) -> int:
        return (ARENA_AT + offset) // 8 + field

    def _segment_name(self, offset: int) -> str:
        """The name of the segment that holds block ``offset``'s value (an
        EXTERNAL block's data is that name)."""
        start = ARENA_AT + offset + BLOCK
        return bytes(self._view[start : start + self._words.load(self._block(offset, B_NAMELEN))]).decode()

    # -- readers ----------------------------------------------------------------------

    def read(self) -> memoryview:
        """A read-only view of the current value (empty before the first
        publish), valid until the calling thread's next quiescent state or
        detach: the thread must be registered with ``cell.domain`` and
        attached. Like ``Cell.value``, read() does not check that (it is the
        hot path); ValueError once the cell is closed in this process.

        The instance's ``read`` is the C fast path (CellReader.read), which
        this method documents and stands in for on the class."""
        return self._reader.read()  # type: ignore[no-any-return]

    def _read_external(self, offset: int) -> memoryview:
        """read() of a value kept in a segment of its own (the C path calls this)."""
        length = int(self._words.load(self._block(offset, B_LENGTH)))
        name = self._segment_name(offset)
        cached = self._external
        if cached is None or cached[0] != name:
            with self._external_lock:
                cached = self._external
                if cached is None or cached[0] != name:
                    # The reader is attached, so the segment is not unlinked
                    # before its next quiescent state (C3): opening it by name
                    # succeeds. Views are views of a CellBlock (_shared.c), as
                    # for values in the arena: threads share no export counts.
                    words = kernel.SharedWords(shm.open_existing(name))
                    cached = (name, words.block(0, length))
                    self._external = cached
        return memoryview(cached[1])

    def read_bytes(self) -> bytes:
        """A copy of the current value (a registered thread's read())."""
        return bytes(self.read())

    # -- writers -------------------------------------------------------------------------

    def publish(self, data: Any) -> int:
        """Copy ``data`` (bytes-like) into shared memory, make it current, and
        retire the value it replaces. Returns the new version. Any thread may
        call it; when the arena is full it reclaims and waits (quiescent
        meanwhile)."""
        try:
            value = memoryview(data)
        except TypeError:
            raise TypeError(
                f"publish() takes a bytes-like value (bytes, bytearray, memoryview, ...), not "
                f"{type(data).__name__}"
            ) from None
        value = value.cast("B") if value.c_contiguous else memoryview(value.tobytes())
        self._check_open()
        with self._lock:
            shm.lock(self._lock_fd, LOCK_PUBLISH)  # C1
            try:
                self._recover_locked()
                return self._publish_locked(value)
            finally:
                shm.unlock(self._lock_fd, LOCK_PUBLISH)

    def _publish_locked(self, value: memoryview) -> int:
        w = self._words
        n = len(value)
        need = BLOCK + _round(n)
        offset = self._allocate_locked(need) if need < self._arena else None
        ext_name = None
        if offset is None:  # larger than the arena (or than what it can ever hold besides the current value)
            offset = self._allocate_locked(DESCRIPTOR)
            assert offset is not None, "a descriptor always fits once the ring holds only the current block"
            ext_name = shm.new_name(self._name[:40] + "_v")
            need = DESCRIPTOR
        old = int(w.load(C_CURRENT))
        version = int(w.load(C_VERSION)) + 1
        # C4: the journal before the ring changes.
        w.store(C_JOURNAL_OLD, old + 1)
        w.store(C_JOURNAL_NEW, offset + 1)
        at = self._block(offset, 0)
        w.store(at + B_SIZE, need)
        w.store(at + B_GOAL, 0)
        w.store(at + B_VERSION, version)
        w.store(at + B_LENGTH, n)
        start = ARENA_AT + offset + BLOCK
        if ext_name is None:
            w.store(at + B_KIND, INLINE)
            self._mm[start : start + n] = value
        else:
            encoded = ext_name.encode()
            w.store(at + B_KIND, EXTERNAL)
            w.store(at + B_NAMELEN, len(encoded))
            self._mm[start : start + len(encoded)] = encoded
            w.store(C_JOURNAL_EXT, 1)  # from here a recovery unlinks the name
            segment = shm.create(ext_name, _round(max(n, 1)))  # whole words: SharedWords maps it
            segment[:n] = value
            segment.close()
            w.add(C_EXTERNAL, 1)
        w.store(C_TAIL, (offset + need) % self._arena)
        w.store(C_CURRENT, offset)  # C2: the publish (release)
        w.store(C_VERSION, version)
        if old >= 0:
            self._retire_block_locked(old)
        w.store(C_JOURNAL_EXT, 0)
        w.store(C_JOURNAL_NEW, 0)
        w.store(C_JOURNAL_OLD, 0)
        w.add(C_PUBLISHES, 1)
        return version

    def _retire_block_locked(self, offset: int) -> None:
        """Give block ``offset`` (no longer current) its goal; an external
        value's segment is handed to the domain's unlink table first, so the
        goal is set only once the unlink is recorded (a retry records it
        again, harmlessly: D5)."""
        w = self._words
        at = self._block(offset, 0)
        if w.load(at + B_GOAL) != 0:
            return
        if w.load(at + B_KIND) == EXTERNAL:
            goal = self._domain.retire_shared_memory(self._segment_name(offset))
        else:
            goal = self._domain._take_goal_any_thread()
        w.store(at + B_GOAL, goal)

    def _recover_locked(self) -> None:
        """C4: finish or undo the publish of a writer that died in it."""
        w = self._words
        new = int(w.load(C_JOURNAL_NEW)) - 1
        if new < 0:
            return
        old = int(w.load(C_JOURNAL_OLD)) - 1
        at = self._block(new, 0)
        if w.load(C_CURRENT) == new:  # published: retire what it replaced
            w.store(C_VERSION, max(int(w.load(C_VERSION)), int(w.load(at + B_VERSION))))
            if old >= 0 and old != new:
                self._retire_block_locked(old)
        else:  # never visible: undo
            if w.load(C_JOURNAL_EXT):
                shm.unlink(self._segment_name(new))
            w.store(C_TAIL, new)
        w.store(C_JOURNAL_EXT, 0)
        w.store(C_JOURNAL_NEW, 0)
        w.store(C_JOURNAL_OLD, 0)
        w.add(C_RECOVERED, 1)

    # -- the ring ------------------------------------------------------------------------

    def _reclaim_locked(self, rd: int) -> None:
        """C3: move head past blocks whose goal rd_seq has reached."""
        w = self._words
        head, tail = int(w.load(C_HEAD)), int(w.load(C_TAIL))
        while head != tail:
            at = self._block(head, 0)
            goal = int(w.load(at + B_GOAL))
            if goal == 0 or goal > rd:
                break
            head = (head + int(w.load(at + B_SIZE))) % self._arena
            w.store(C_HEAD, head)

    def _fit(self, need: int) -> int | None:
        """Where a block of ``need`` bytes goes now (wrapping with a pad), or None."""
        w = self._words
        head, tail, cap = int(w.load(C_HEAD)), int(w.load(C_TAIL)), self._arena
        if head == tail:  # empty: start over at 0
            w.store(C_HEAD, 0)
            w.store(C_TAIL, 0)
            return 0 if need < cap else None
        # head == tail means empty, so no allocation may make tail reach head:
        # hence the strict comparisons (and the wrap only when need < head).
        if tail > head:
            if tail + need < cap or (tail + need == cap and head > 0):
                return tail
            if need < head:  # wrap: a pad block to the end
                pad = self._block(tail, 0)
                w.store(pad + B_SIZE, cap - tail)
                w.store(pad + B_GOAL, 1)
                w.store(pad + B_KIND, PAD)
                w.store(C_TAIL, 0)
                return 0
            return None
        return tail if tail + need < head else None

    def _allocate_locked(self, need: int) -> int | None:
        """A place for ``need`` bytes, reclaiming and waiting while blocks in
        grace periods fill the ring; None when it cannot fit even once the ring
        holds only the current block."""
        domain = self._domain
        delay = 0.0002
        waited = False
        while True:
            self._reclaim_locked(domain.rd_seq)
            offset = self._fit(need)
            if offset is not None:
                return offset
            w = self._words
            if w.load(C_HEAD) == w.load(C_CURRENT):
                return None  # only the current block is left: it will never fit
            # Wait for the oldest block's goal; the caller counts as quiescent.
            goal = int(w.load(self._block(int(w.load(C_HEAD)), B_GOAL)))
            if not waited:
                w.add(C_FULL_WAITS, 1)
                waited = True
            with domain._quiescent_wait():
                if goal == 0 or goal > domain.wr_seq:
                    domain._advance()
                if not domain.poll(goal):
                    time.sleep(delay)
                    delay = min(delay * 2, 0.005)

    # -- lifetime ---------------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        """The arena, across processes: bytes in use, publishes, waits for a
        full arena, values in segments of their own, dead writers' publishes
        recovered."""
        w = self._words
        head, tail = int(w.load(C_HEAD)), int(w.load(C_TAIL))
        used = (tail - head) % self._arena if head != tail else 0
        return {
            "capacity": self._arena,
            "used": used,
            "version": int(w.load(C_VERSION)),
            "publishes": int(w.load(C_PUBLISHES)),
            "full_waits": int(w.load(C_FULL_WAITS)),
            "external": int(w.load(C_EXTERNAL)),
            "recovered": int(w.load(C_RECOVERED)),
        }

    def close(self) -> None:
        """This process leaves the cell (and its domain: SharedDomain.close)."""
        if self._closed:
            return
        self._closed = True
        self._reader.close()
        self._external = None
        self._domain.close()
        try:
            os.close(self._lock_fd)
        except OSError:
            pass

    def unlink(self) -> None:
        """Remove every segment of the cell: its arena, its domain, the current
        value's own segment and those still waiting in the domain's table.
        Call it once every process is done with the cell."""
        w = self._words
        current = int(w.load(C_CURRENT))
        if current >= 0 and w.load(self._block(current, B_KIND)) == EXTERNAL:
            shm.unlink(self._segment_name(current))
        self._domain._unlink_all_pending()
        self._domain.unlink()
        shm.unlink(self._name)

    def __enter__(self) -> SharedCell:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _after_fork_in_child(self) -> None:
        self._new_process_state()
        if self._closed:
            return
        try:
            os.close(self._lock_fd)
        except OSError:
            pass
        try:
            self._lock_fd = shm.open_lock_fd(self._name)
        except OSError:
            self._closed = True
