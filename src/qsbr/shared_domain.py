"""SharedDomain: one QSBR domain for the threads of many processes.

The design's words, moved into a named shared-memory segment (shm.py) that
every participating process maps: ``wr_seq``, ``rd_seq`` and one slot per
registered thread (its ``seq``, and which process owns it). A reader's
``quiescent()`` stores seq = wr_seq into its slot; a scan (``poll``) takes
the minimum over attached slots of every process. What a process retires is
released in that process (a release is one of its callables); the one kind
of release every process can perform, ``retire_shared_memory(name)``, is
recorded in the segment's table of pending unlinks, so that it happens even
if the process that asked dies first.

What processes add to the design is death. A process killed with SIGKILL
leaves its slots behind, seq frozen, and would hold rd_seq back for good.
Each process that registers a thread claims a *process entry* and holds its
liveness lock (an open-file-description lock, shm.py) for as long as it
lives; the kernel drops that lock when the process dies, however it dies.
A scan whose minimum is held by another process's slot asks whether that
process's lock is still held; if not, the process is dead and its slots are
*evicted*: seq treated as detached, slots freed, ``evicted`` counted, one
WARNING on logger "qsbr" naming the pid. docs/design.md argues why that is
safe (a dead process reads nothing) and why pid reuse cannot fool it.

Segment layout (int64 words; the constants below): a header of 64 words
(magic, layout version, sizes, wr_seq and rd_seq on cache lines of their
own, counters), then ``capacity`` process entries, ``capacity`` thread slots
(64 bytes each, so that readers of different processes do not share a cache
line), and UNLINKS entries of the table of pending unlinks.

Invariants (with S1-S5 of _shared.c):
  D1. Claiming and freeing slots and process entries, eviction, and every
      change to the unlink table happen under the domain's structure lock
      (a threading.Lock in the process, then an OFD lock across processes:
      never left held by a dead process).
  D2. A process entry is marked live only after its process holds the
      entry's liveness lock, and its liveness lock is released only after
      the entry is marked free: a live entry whose lock nobody holds belongs
      to a dead process.
  D3. A process evicts only entries other than its own, and only under D1
      after seeing the entry live with its lock free.
  D4. A free slot's seq is 0. A slot is claimed owner first (its seq still
      0: detached), then seq = wr_seq; it is freed seq = 0 first, then the
      owner. A process killed half-way through either leaves a slot that
      is owned by a dead process and detached: it never holds rd_seq back,
      and the next sweep (_evict_dead_locked) frees it.
  D5. An unlink entry is written whole (name, goal) before its state is set
      pending, and its state is set free only after the unlink ran: a
      process killed between the two leaves an entry whose unlink runs
      again (and finds the name gone: names are never reused).

SharedDomain needs the native kernel: Python has no atomic operations on
memory shared with other processes (a plain store into an mmap is not
ordered, and wr_seq's advance must be an atomic add). On the pure-Python
kernel it raises RuntimeError saying so.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from . import _fork, kernel, shm
from .errors import NotRegisteredError
from .options import check_int
from .stats import DomainStats

__all__ = ["SharedDomain", "SharedDomainStats", "SharedThreadHandle"]

logger = logging.getLogger("qsbr")

MAGIC = int.from_bytes(b"QSBRdom\x01", "little")
LAYOUT_VERSION = 1

# Header words.
H_MAGIC, H_VERSION, H_CAPACITY, H_UNLINKS, H_READY = 0, 1, 2, 3, 4
H_WR_SEQ = 8  # own cache line
H_RD_SEQ = 16  # own cache line
H_EVICTED, H_UNLINKS_PENDING, H_GRACE_PERIODS = 24, 25, 26
HEADER_WORDS = 64

# A process entry (PROC_WORDS words): live or free, and who.
PROC_WORDS = 8
P_STATE, P_PID = 0, 1
# A thread slot: its seq (0 = detached) and its owner (process entry + 1; 0 = free).
SLOT_WORDS = 8
S_SEQ, S_OWNER, S_TID = 0, 1, 2
# An entry of the table of pending unlinks.
UNLINKS = 256
UNLINK_WORDS = 16
U_STATE, U_GOAL, U_LENGTH, U_NAME = 0, 1, 2, 3  # the name's bytes start at word U_NAME

FREE, LIVE, PENDING = 0, 1, 1

# OFD lock offsets (shm.LOCK_BASE is added): the structure lock, and one
# liveness lock per process entry.
LOCK_STRUCTURE = 0
LOCK_LIVE = 16

MAX_CAPACITY = 1 << 16


def layout_words(capacity: int) -> int:
    return HEADER_WORDS + capacity * (PROC_WORDS + SLOT_WORDS) + UNLINKS * UNLINK_WORDS


def _native_atomics() -> Any:
    why = shm.available() or kernel.shared_error
    if why is not None:
        raise RuntimeError(
            f"SharedDomain and SharedCell need the native kernel's atomics on shared memory: {why}. "
            "Install qsbr where a C compiler is available and unset QSBR_PURE_PYTHON."
        )
    return kernel.SharedWords


@dataclass(frozen=True)
class SharedDomainStats(DomainStats):
    """DomainStats for a SharedDomain. The seqs, ``threads``/``attached``/
    ``detached``, ``grace_periods``, ``evicted`` and ``processes`` count every
    process; the rest count this process's own calls and releases."""

    #: Thread slots freed because their process died (all processes, ever).
    evicted: int = 0
    #: Live processes with at least one registered thread.
    processes: int = 0
    #: Unlinks waiting in the domain's table (every process's).
    pending_unlinks: int = 0


class SharedThreadHandle:
    """A registered thread's handle: ``quiescent()``, ``attach()``,
    ``detach()`` act on its slot directly (the cheap forms; use them from
    the thread that registered, like ThreadHandle)."""

    __slots__ = ("_domain", "_slot", "_index", "quiescent", "attach", "detach", "__weakref__")

    def __init__(self, domain: SharedDomain, slot: Any, index: int) -> None:
        self._domain = domain
        self._slot = slot
        self._index = index
        self.quiescent: Callable[[], None] = slot.quiescent
        self.attach: Callable[[], None] = slot.attach
        self.detach: Callable[[], None] = slot.detach

    @property
    def domain(self) -> SharedDomain:
        return self._domain

    @property
    def registered(self) -> bool:
        return bool(self._slot.valid)

    @property
    def seq(self) -> int:
        return int(self._slot.seq)

    def __repr__(self) -> str:
        return f"<qsbr.SharedThreadHandle slot={self._index} seq={self.seq} registered={self.registered}>"


class _ThreadExit:
    """Kept in the thread-local: when the thread ends, its locals are dropped
    and this frees the slot it still held (nothing else can)."""

    __slots__ = ("_domain", "_handle", "_pid")

    def __init__(self, domain: SharedDomain, handle: SharedThreadHandle) -> None:
        self._domain = weakref.ref(domain)
        self._handle = handle
        self._pid = os.getpid()

    def __del__(self) -> None:
        domain = self._domain()
        # Only in the process that registered: a forked child drops its copy
        # of the thread-local, and the slot is its parent's.
        if domain is not None and self._pid == os.getpid() and self._handle.registered:
            try:
                domain._free_slot(self._handle)
            except Exception:  # the domain was closed meanwhile; nothing to free
                pass


class SharedDomain:
    """A QSBR domain shared by the threads of many processes. See the module
    docstring, docs/api.md ("SharedDomain") and docs/guide.md ("Processes")."""

    def __init__(
        self,
        name: str | None = None,
        *,
        create: bool = False,
        capacity: int = 256,
        deferred_limit: int = 10,
    ) -> None:
        words_type = _native_atomics()
        if not isinstance(create, bool):
            raise TypeError(f"create must be True or False, not {type(create).__name__}")
        check_int("capacity", capacity, minimum=1)
        if capacity > MAX_CAPACITY:
            raise ValueError(f"capacity must be at most {MAX_CAPACITY} thread slots, not {capacity}")
        check_int("deferred_limit", deferred_limit, minimum=1)
        if name is None:
            if not create:
                raise ValueError("name is required to open an existing SharedDomain (or pass create=True)")
            name = shm.new_name()
        name = shm.check_name(name)
        if create:
            mm = shm.create(name, layout_words(capacity) * 8)
        else:
            mm = shm.open_existing(name)
        try:
            words = words_type(mm)
            if create:
                self._initialize(words, capacity)
            else:
                capacity = self._check_layout(words, name)
            self._lock_fd = shm.open_lock_fd(name)
        except BaseException:
            if create:
                shm.unlink(name)
            raise
        self._name = name
        self._mm = mm
        self._words = words
        self._capacity = capacity
        self._procs_at = HEADER_WORDS
        self._slots_at = HEADER_WORDS + capacity * PROC_WORDS
        self._unlinks_at = self._slots_at + capacity * SLOT_WORDS
        self._deferred_limit = deferred_limit
        self._closed = False
        self._new_process_state()
        _fork.track(self)

    def _new_process_state(self) -> None:
        """What belongs to this process alone (made again in a forked child)."""
        self._local = threading.Lock()  # D1, the in-process half
        self._tls = threading.local()
        self._handles: dict[int, SharedThreadHandle] = {}  # slot index -> handle
        self._proc: int | None = None  # our process entry
        self._pending: collections.deque[tuple[int, Callable[..., Any], tuple[Any, ...], dict[str, Any], int]]
        self._pending = collections.deque()
        self._plock = threading.Lock()
        self._retire_count = 0
        self._advance_times: collections.deque[tuple[int, float]] = collections.deque()
        self._counts = dict.fromkeys(
            (
                "advances",
                "polls",
                "failed_polls",
                "scans",
                "retired",
                "releases",
                "release_errors",
                "peak_pending",
                "pending_bytes",
                "peak_pending_bytes",
                "released_bytes",
                "forgotten_at_fork",
            ),
            0,
        )
        self._longest_grace = 0.0

    @staticmethod
    def _initialize(words: Any, capacity: int) -> None:
        words.store(H_VERSION, LAYOUT_VERSION)
        words.store(H_CAPACITY, capacity)
        words.store(H_UNLINKS, UNLINKS)
        words.store(H_WR_SEQ, 1)
        words.store(H_RD_SEQ, 1)
        words.store(H_MAGIC, MAGIC)
        words.store(H_READY, 1)  # last: an opener waits for it

    @staticmethod
    def _check_layout(words: Any, name: str) -> int:
        deadline = time.monotonic() + 2.0
        while words.count >= HEADER_WORDS and words.load(H_MAGIC) == 0 and time.monotonic() < deadline:
            time.sleep(0.001)  # a segment just made: its creator is writing the header
        if words.count < HEADER_WORDS or words.load(H_MAGIC) != MAGIC:
            raise ValueError(f"shared-memory segment {name!r} is not a qsbr SharedDomain (no qsbr magic)")
        if words.load(H_VERSION) != LAYOUT_VERSION:
            raise ValueError(
                f"SharedDomain {name!r} has layout version {words.load(H_VERSION)}; this qsbr reads "
                f"version {LAYOUT_VERSION}: open it with the qsbr version that made it"
            )
        deadline = time.monotonic() + 2.0
        while words.load(H_READY) != 1:  # its creator is still writing the header
            if time.monotonic() > deadline:
                raise ValueError(f"SharedDomain {name!r} was never initialized (its creator died making it?)")
            time.sleep(0.001)
        capacity = int(words.load(H_CAPACITY))
        if capacity < 1 or words.count < layout_words(capacity) or words.load(H_UNLINKS) != UNLINKS:
            raise ValueError(f"SharedDomain {name!r} has a damaged header (capacity {capacity})")
        return capacity

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"wr_seq={self.wr_seq} rd_seq={self.rd_seq}"
        return f"<qsbr.SharedDomain {self._name!r} capacity={self._capacity} {state}>"

    # -- names and lifetime ----------------------------------------------

    @property
    def name(self) -> str:
        """The segment's name (as SharedMemory(name) would take it)."""
        return self._name

    @property
    def capacity(self) -> int:
        """Thread slots across all processes."""
        return self._capacity

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def deferred_limit(self) -> int:
        return self._deferred_limit

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"SharedDomain {self._name!r} is closed in this process: open it again")

    def unlink(self) -> None:
        """Remove the segment's name (as SharedMemory.unlink). Processes that
        have it open keep using it; nobody can open it any more."""
        shm.unlink(self._name)

    def close(self, timeout: float | None = None) -> None:
        """This process leaves: its threads' slots are freed, then the call
        waits until what it retired has run and the table's unlinks whose
        goals were reached are done. With a timeout, TimeoutError if that
        takes longer (the domain stays open: call close() again)."""
        if self._closed:
            return
        with self._local:
            for handle in list(self._handles.values()):
                self._free_slot_locked(handle)
        if not self.barrier(timeout):
            raise TimeoutError(
                f"SharedDomain.close(): {len(self._pending)} releases of this process still wait for "
                "readers of other processes; call close() again (or without a timeout)"
            )
        with self._local:
            if self._closed:
                return
            self._closed = True
            if self._proc is not None:
                self._free_process_locked()
            os.close(self._lock_fd)

    def __enter__(self) -> SharedDomain:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the structure lock (D1) -------------------------------------------

    @contextmanager
    def _structure(self, fd: int | None = None) -> Iterator[None]:
        """D1: hold with self._local already held."""
        fd = self._lock_fd if fd is None else fd
        shm.lock(fd, LOCK_STRUCTURE)
        try:
            yield
        finally:
            shm.unlock(fd, LOCK_STRUCTURE)

    # -- process entries ------------------------------------------------------

    def _proc_word(self, entry: int, field: int) -> int:
        return self._procs_at + entry * PROC_WORDS + field

    def _claim_process_locked(self) -> int:
        """Our process entry, claimed if we have none (self._local held)."""
        if self._proc is not None:
            return self._proc
        w = self._words
        with self._structure():
            for attempt in range(2):
                if attempt == 1:
                    self._evict_dead_locked()  # a dead process's entry becomes free
                for entry in range(self._capacity):
                    if w.load(self._proc_word(entry, P_STATE)) != FREE:
                        continue
                    # D2: the liveness lock first, then the entry marked live.
                    if not shm.try_lock(self._lock_fd, LOCK_LIVE + entry):
                        continue  # its last owner is still closing
                    w.store(self._proc_word(entry, P_PID), os.getpid())
                    w.store(self._proc_word(entry, P_STATE), LIVE)
                    self._proc = entry
                    return entry
        raise self._capacity_error()

    def _free_process_locked(self) -> None:
        entry = self._proc
        assert entry is not None
        with self._structure():
            self._words.store(self._proc_word(entry, P_STATE), FREE)  # D2: before the lock goes
        shm.unlock(self._lock_fd, LOCK_LIVE + entry)
        self._proc = None

    def _capacity_error(self) -> RuntimeError:
        return RuntimeError(
            f"SharedDomain {self._name!r} is full: all {self._capacity} thread slots (its capacity) are "
            "registered by live processes; unregister threads that are done, or create the domain with a "
            "larger capacity=..."
        )

    def _alive(self, entry: int) -> bool:
        """Whether process entry ``entry`` belongs to a live process (D2)."""
        if entry == self._proc:
            return True
        try:
            return shm.held_elsewhere(self._lock_fd, LOCK_LIVE + entry)
        except OSError:
            # Liveness that cannot be read is life: evicting a live reader
            # would be a use-after-free, a stuck slot is only a stall.
            return True

    def _evict_dead_locked(self, only: int | None = None) -> int:
        """Evict every dead process's slots (or entry ``only``'s); under the
        structure lock (D1, D3). Returns how many slots were freed."""
        w = self._words
        entries = range(self._capacity) if only is None else (only,)
        freed = 0
        for entry in entries:
            if w.load(self._proc_word(entry, P_STATE)) != LIVE or self._alive(entry):
                continue
            slots = 0
            for index in range(self._capacity):
                at = self._slots_at + index * SLOT_WORDS
                if w.load(at + S_OWNER) == entry + 1:
                    w.store(at + S_SEQ, 0)  # D4: seq first
                    w.store(at + S_OWNER, 0)
                    slots += 1
            pid = w.load(self._proc_word(entry, P_PID))
            w.store(self._proc_word(entry, P_STATE), FREE)
            if slots:
                w.add(H_EVICTED, slots)
                logger.warning(
                    "qsbr: process %d died holding %d thread slot(s) of SharedDomain %r; evicted them",
                    pid,
                    slots,
                    self._name,
                )
            freed += slots
        return freed

    # -- threads -------------------------------------------------------------------

    def register(self) -> SharedThreadHandle:
        """The calling thread joins the domain, attached, with seq = wr_seq.
        Returns its handle, whose quiescent() is the cheap form."""
        with self._local:
            self._check_open()
            if getattr(self._tls, "handle", None) is not None:
                raise RuntimeError(
                    "this thread is already registered with this SharedDomain; use domain.handle() "
                    "(or unregister() first)"
                )
            proc = self._claim_process_locked()
            index = self._claim_slot_locked(proc)
            handle = SharedThreadHandle(
                self, kernel.SharedSlot(self._words, self._slots_at + index * SLOT_WORDS, H_WR_SEQ), index
            )
            handle.attach()  # S4: the fence before the thread reads anything shared
            self._handles[index] = handle
            self._tls.handle = handle
            self._tls.exit = _ThreadExit(self, handle)
            return handle

    def _claim_slot_locked(self, proc: int) -> int:
        w = self._words
        with self._structure():
            for attempt in range(2):
                for index in range(self._capacity):
                    at = self._slots_at + index * SLOT_WORDS
                    if w.load(at + S_OWNER) == 0:
                        # D4: owner first (seq is still 0: detached), then seq.
                        w.store(at + S_OWNER, proc + 1)
                        w.store(at + S_TID, threading.get_ident())
                        w.store(at + S_SEQ, w.load(H_WR_SEQ))
                        return index
                if attempt == 0 and not self._evict_dead_locked():
                    break
        raise self._capacity_error()

    def _free_slot(self, handle: SharedThreadHandle) -> None:
        with self._local:
            if not self._closed:
                self._free_slot_locked(handle)

    def _free_slot_locked(self, handle: SharedThreadHandle) -> None:
        if not handle._slot.valid:
            return
        handle._slot.invalidate()
        at = self._slots_at + handle._index * SLOT_WORDS
        with self._structure():
            if self._words.load(at + S_OWNER) == (self._proc or 0) + 1:  # not evicted meanwhile
                self._words.store(at + S_SEQ, 0)  # D4
                self._words.store(at + S_OWNER, 0)
        self._handles.pop(handle._index, None)

    def unregister(self) -> None:
        """The calling thread leaves; its slot is freed. What it retired stays
        queued in this process, never lost, never released early."""
        handle = self._own("unregister")
        self._free_slot(handle)
        self._tls.handle = None
        self._tls.exit = None

    def is_registered(self) -> bool:
        handle = getattr(self._tls, "handle", None)
        return handle is not None and handle.registered

    def handle(self) -> SharedThreadHandle:
        """The calling thread's handle (the one register() returned)."""
        return self._own("handle")

    @contextmanager
    def registered(self) -> Iterator[SharedThreadHandle]:
        """``with domain.registered():`` register on enter, unregister on exit."""
        handle = self.register()
        try:
            yield handle
        finally:
            self.unregister()

    def _own(self, what: str) -> SharedThreadHandle:
        handle: SharedThreadHandle | None = getattr(self._tls, "handle", None)
        if handle is None or not handle.registered:
            if self._closed:
                self._check_open()
            raise NotRegisteredError.for_call(what)
        return handle

    def quiescent(self) -> None:
        """The calling thread holds nothing it read from shared structures."""
        self._own("quiescent").quiescent()

    def detach(self) -> None:
        """The calling thread stops reading shared structures until attach()."""
        self._own("detach").detach()

    def attach(self) -> None:
        """The calling thread resumes reading (seq = wr_seq)."""
        self._own("attach").attach()

    @contextmanager
    def detached(self) -> Iterator[None]:
        """``with domain.detached():`` detach for a blocking call, attach after."""
        handle = self._own("detached")
        was_attached = handle.seq != 0
        handle.detach()
        try:
            yield
        finally:
            if was_attached:
                handle.attach()

    def is_attached(self) -> bool:
        handle = getattr(self._tls, "handle", None)
        return handle is not None and handle.registered and handle.seq != 0

    # -- sequence numbers ------------------------------------------------------

    @property
    def wr_seq(self) -> int:
        """The global write sequence (all processes): starts at 1, +2 per advance."""
        return int(self._words.load(H_WR_SEQ))

    @property
    def rd_seq(self) -> int:
        """min(seq) over attached slots of all processes as of the last scan."""
        return int(self._words.load(H_RD_SEQ))

    def advance(self) -> int:
        """wr_seq += 2 (an atomic add across processes); the new wr_seq."""
        self._check_open()
        return self._advance()

    def _advance(self) -> int:
        wr = int(self._words.add(H_WR_SEQ, 2))
        self._counts["advances"] += 1
        self._advance_times.append((wr, time.monotonic()))
        if len(self._advance_times) > 1024:
            self._advance_times.popleft()
        return wr

    def goal_reached(self, goal: int) -> bool:
        """goal <= rd_seq, without scanning."""
        return bool(goal <= self._words.load(H_RD_SEQ))

    def _take_goal(self) -> int:
        """The design's deferred advance, counted per process: wr_seq + 2,
        advancing on every deferred_limit-th call. Call with self._plock."""
        self._retire_count += 1
        if self._retire_count % self._deferred_limit == 0:
            return self._advance()
        return int(self._words.load(H_WR_SEQ)) + 2

    def _take_goal_any_thread(self) -> int:
        """_take_goal for callers that do not hold self._plock (SharedCell)."""
        with self._plock:
            return self._take_goal()

    # -- retire ---------------------------------------------------------------------

    def retire(self, obj: Any, release: Callable[[Any], Any], *, size: int | None = None) -> int:
        """Schedule release(obj) (in this process) for when no thread of any
        process can still hold obj. Returns the goal. Any thread may call it."""
        if not callable(release):
            raise TypeError(f"release must be callable (it is called as release(obj)), not {release!r}")
        return self._schedule(release, (obj,), {}, size)

    def defer(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> int:
        """Schedule fn(*args, **kwargs) like retire() schedules a release."""
        if not callable(fn):
            raise TypeError(f"defer() needs a callable, not {fn!r}")
        return self._schedule(fn, args, kwargs, None)

    def _schedule(
        self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], size: int | None
    ) -> int:
        if size is not None:
            check_int("size", size, minimum=0)
        self._check_open()
        nbytes = size or 0
        c = self._counts
        with self._plock:
            advances = c["advances"]
            goal = self._take_goal()
            self._pending.append((goal, fn, args, kwargs, nbytes))
            c["retired"] += 1
            c["pending_bytes"] += nbytes
            c["peak_pending"] = max(c["peak_pending"], len(self._pending))
            c["peak_pending_bytes"] = max(c["peak_pending_bytes"], c["pending_bytes"])
            advanced = c["advances"] != advances
        if advanced:
            self.poll()
        return goal

    def retire_shared_memory(self, name: str) -> int:
        """Unlink shared-memory segment ``name`` once no thread of any process
        can still hold it. Recorded in this domain's segment: if this process
        dies first, a surviving participant's poll() does it. Returns the goal."""
        name = shm.check_name(name)
        self._check_open()
        data = name.encode()
        w = self._words
        delay = 0.0005
        while True:
            with self._local, self._structure():
                for entry in range(UNLINKS):
                    at = self._unlinks_at + entry * UNLINK_WORDS
                    if w.load(at + U_STATE) == FREE:
                        with self._plock:
                            goal = self._take_goal()
                        # D5: name and goal first, the state last.
                        start = (at + U_NAME) * 8
                        self._mm[start : start + len(data)] = data
                        w.store(at + U_LENGTH, len(data))
                        w.store(at + U_GOAL, goal)
                        w.store(at + U_STATE, PENDING)
                        w.add(H_UNLINKS_PENDING, 1)
                        return goal
            # The table is full: wait for its oldest unlinks, quiescent meanwhile.
            with self._quiescent_wait():
                self.poll()
                time.sleep(delay)
            delay = min(delay * 2, 0.01)

    # -- poll -------------------------------------------------------------------------

    def _scan(self) -> int:
        """rd_seq from a scan of every process's slots, evicting a dead
        process whose slot holds the minimum; published with raise_to (S2)."""
        w = self._words
        self._counts["scans"] += 1
        while True:
            wr = int(w.load(H_WR_SEQ))
            lowest, index = w.scan(self._slots_at + S_SEQ, self._capacity, SLOT_WORDS, wr)
            if index < 0:
                break
            owner = int(w.load(self._slots_at + index * SLOT_WORDS + S_OWNER)) - 1
            if owner < 0 or owner == self._proc or self._alive(owner):
                break  # held by a live process (or freed meanwhile: the next scan sees it)
            with self._local, self._structure():
                if not self._evict_dead_locked(only=owner):
                    break
        before = int(w.load(H_RD_SEQ))
        rd = int(w.raise_to(H_RD_SEQ, lowest))
        if rd > before:
            w.add(H_GRACE_PERIODS, 1)
        self._note_grace(rd)
        return rd

    def _note_grace(self, rd: int) -> None:
        times = self._advance_times
        now = time.monotonic()
        while times and times[0][0] <= rd:
            try:
                _, started = times.popleft()
            except IndexError:
                break
            self._longest_grace = max(self._longest_grace, now - started)

    def _oldest_goal(self) -> int | None:
        """The smallest goal waiting here or in the unlink table (None if none)."""
        oldest = None
        if self._pending:
            try:
                oldest = self._pending[0][0]
            except IndexError:
                pass
        w = self._words
        if w.load(H_UNLINKS_PENDING) > 0:
            for entry in range(UNLINKS):
                at = self._unlinks_at + entry * UNLINK_WORDS
                if w.load(at + U_STATE) == PENDING:
                    goal = int(w.load(at + U_GOAL))
                    oldest = goal if oldest is None else min(oldest, goal)
        return oldest

    def poll(self, goal: int | None = None) -> bool:
        """Scan every process's slots (evicting dead processes), run this
        process's releases whose goal <= rd_seq, and do the table's unlinks
        that are ready (anyone's). Advances wr_seq when a waiting goal needs
        it. True when ``goal`` is reached, or (goal None) nothing of this
        process waits any more."""
        self._check_open()
        self._counts["polls"] += 1
        oldest = self._oldest_goal()
        if oldest is not None and oldest > self._words.load(H_WR_SEQ):
            self._advance()  # the deferred advance's catch-up
        rd = self._scan()
        ran = self._run_ready(rd)
        ran += self._unlink_ready(rd)
        if not ran and oldest is not None:
            self._counts["failed_polls"] += 1
        if goal is not None:
            return goal <= rd
        return not self._pending

    def _run_ready(self, rd: int) -> int:
        # Goals are taken and appended under _plock, and wr_seq only grows, so
        # the deque's goals are nondecreasing: the ready releases are a prefix.
        batch = []
        with self._plock:
            pending = self._pending
            while pending and pending[0][0] <= rd:
                batch.append(pending.popleft())
        c = self._counts
        for _goal, fn, args, kwargs, nbytes in batch:
            try:
                fn(*args, **kwargs)
            except Exception:
                c["release_errors"] += 1
                logger.exception("qsbr: a release of SharedDomain %r raised", self._name)
            with self._plock:
                c["releases"] += 1
                c["pending_bytes"] -= nbytes
                c["released_bytes"] += nbytes
        return len(batch)

    def _unlink_ready(self, rd: int) -> int:
        w = self._words
        if w.load(H_UNLINKS_PENDING) <= 0:
            return 0
        done = 0
        with self._local, self._structure():
            for entry in range(UNLINKS):
                at = self._unlinks_at + entry * UNLINK_WORDS
                if w.load(at + U_STATE) == PENDING and w.load(at + U_GOAL) <= rd:
                    self._unlink_entry_locked(at)
                    done += 1
        return done

    def _unlink_entry_locked(self, at: int) -> None:
        """Perform the unlink table's entry at word ``at`` and free it (D1 held).
        D5: the unlink first, then the state: a process killed between the two
        leaves an entry whose unlink runs again and finds the name gone."""
        w = self._words
        start = (at + U_NAME) * 8
        shm.unlink(bytes(self._mm[start : start + int(w.load(at + U_LENGTH))]).decode())
        w.store(at + U_STATE, FREE)
        w.add(H_UNLINKS_PENDING, -1)

    def _unlink_all_pending(self) -> int:
        """Do every unlink in the table now, ready or not: for the teardown of
        SharedCell.unlink(), once every process is done (this one may have
        closed the domain already). Returns how many."""
        w = self._words
        done = 0
        try:
            fd = shm.open_lock_fd(self._name)
        except FileNotFoundError:
            fd = None
        try:
            with self._local, self._structure(fd) if fd is not None else contextlib.nullcontext():
                for entry in range(UNLINKS):
                    at = self._unlinks_at + entry * UNLINK_WORDS
                    if w.load(at + U_STATE) == PENDING:
                        self._unlink_entry_locked(at)
                        done += 1
        finally:
            if fd is not None:
                os.close(fd)
        return done

    @contextmanager
    def _quiescent_wait(self) -> Iterator[None]:
        """A registered, attached caller is quiescent while it waits (it holds
        nothing across the waiting call): detached, attached again after."""
        handle = getattr(self._tls, "handle", None)
        if handle is not None and handle.registered and handle.seq != 0:
            handle.detach()
            try:
                yield
            finally:
                handle.attach()
        else:
            yield

    def synchronize(self, timeout: float | None = None) -> bool:
        """Wait until every thread (of any process) attached at the call has
        passed a quiescent state after it; False on timeout. The caller
        counts as quiescent while it waits."""
        self._check_open()
        deadline = None if timeout is None else time.monotonic() + timeout
        target = self._advance()
        return self._wait_until(lambda: self._scan() >= target, deadline)

    def barrier(self, timeout: float | None = None) -> bool:
        """Wait until every release this process scheduled before the call,
        and every unlink in the table, has run; False on timeout."""
        self._check_open()
        deadline = None if timeout is None else time.monotonic() + timeout
        goal = int(self._words.load(H_WR_SEQ)) + 2

        def done() -> bool:
            self.poll()
            oldest = self._oldest_goal()
            return oldest is None or oldest > goal

        return self._wait_until(done, deadline)

    def _wait_until(self, ready: Callable[[], bool], deadline: float | None) -> bool:
        delay = 0.0002
        with self._quiescent_wait():
            while not ready():
                if deadline is not None and time.monotonic() >= deadline:
                    return False
                # Nothing to do but wait for other processes' quiescent states.
                time.sleep(delay)
                delay = min(delay * 2, 0.01)
                oldest = self._oldest_goal()
                if oldest is not None and oldest > self._words.load(H_WR_SEQ):
                    self._advance()
        return True

    # -- what is going on -------------------------------------------------------------

    @property
    def pending(self) -> int:
        """This process's releases not yet run."""
        return len(self._pending)

    def processes(self) -> list[int]:
        """The pids of the live processes with a registered thread."""
        w = self._words
        owners = set()
        for index in range(self._capacity):
            owner = int(w.load(self._slots_at + index * SLOT_WORDS + S_OWNER))
            if owner:
                owners.add(owner - 1)
        return sorted(
            int(w.load(self._proc_word(e, P_PID)))
            for e in owners
            if w.load(self._proc_word(e, P_STATE)) == LIVE and self._alive(e)
        )

    def stats(self) -> SharedDomainStats:
        """Counters (see SharedDomainStats for which count every process)."""
        w = self._words
        threads = attached = 0
        for index in range(self._capacity):
            at = self._slots_at + index * SLOT_WORDS
            if w.load(at + S_OWNER):
                threads += 1
                attached += w.load(at + S_SEQ) != 0
        rd = int(w.load(H_RD_SEQ))
        times = self._advance_times
        current = 0.0
        if times:
            try:
                seq, started = times[0]
                if seq > rd:
                    current = time.monotonic() - started
            except IndexError:
                pass
        c = self._counts
        return SharedDomainStats(
            wr_seq=int(w.load(H_WR_SEQ)),
            rd_seq=rd,
            advances=c["advances"],
            polls=c["polls"],
            failed_polls=c["failed_polls"],
            scans=c["scans"],
            grace_periods=int(w.load(H_GRACE_PERIODS)),
            retired=c["retired"],
            releases=c["releases"],
            release_errors=c["release_errors"],
            pending=len(self._pending),
            peak_pending=c["peak_pending"],
            threads=threads,
            attached=attached,
            detached=threads - attached,
            pending_bytes=c["pending_bytes"],
            peak_pending_bytes=c["peak_pending_bytes"],
            released_bytes=c["released_bytes"],
            longest_grace_period=self._longest_grace,
            current_grace_period=current,
            stalls=0,
            full_waits=0,
            limit_errors=0,
            forgotten_at_fork=c["forgotten_at_fork"],
            evicted=int(w.load(H_EVICTED)),
            processes=len(self.processes()) if not self._closed else 0,
            pending_unlinks=int(w.load(H_UNLINKS_PENDING)),
        )

    # -- fork -------------------------------------------------------------------------

    def _after_fork_in_child(self) -> None:
        """A child does not inherit its parent's slots (nor its process entry,
        nor its releases: like Domain(on_fork="drop")). It needs a lock
        descriptor of its own (shm.py: the inherited one is the parent's)."""
        dropped = len(self._pending)
        self._new_process_state()
        self._counts["forgotten_at_fork"] = dropped
        if self._closed:
            return
        try:
            os.close(self._lock_fd)
        except OSError:
            pass
        try:
            self._lock_fd = shm.open_lock_fd(self._name)
        except OSError:
            # The name was unlinked: this child cannot take the domain's locks.
            self._closed = True
