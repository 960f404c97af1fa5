"""Named shared-memory segments, and locks that die with their holder.

A SharedDomain or SharedCell lives in POSIX shared memory (on Linux, a file
under /dev/shm), named as ``multiprocessing.shared_memory.SharedMemory``
names segments: ``SharedMemory(name)`` and these functions reach the same
segment. They do not use ``SharedMemory`` itself: its ``resource_tracker``
unlinks a segment when the process that made it exits, and warns about
"leaked" ones, behind the backs of the processes still using it (3.13 has
``track=False``; 3.11 and 3.12 do not, and 3.11's tracker forgets a name once
per process). Here a segment is removed only by ``unlink`` or by the domain's
table of pending unlinks.

Locks are Linux open-file-description locks (``F_OFD_SETLK``) on byte ranges
of the segment's file, far past its end. The kernel drops such a lock when
the last descriptor of its open file description closes, and a process's
descriptors close when it exits, whatever killed it: a lock can never be
left held by a dead process, and nothing in the segment is a lock byte.
Held by a live process, the same lock is a liveness token that pid reuse
cannot fool: a new process that got a dead one's pid does not hold the dead
one's lock (docs/design.md, "Across processes").

One caveat decides how descriptors are used. An open file description is
shared by dup() and inherited across fork(), and mmap dups the descriptor it
maps. So each segment is opened twice: once to map it (that descriptor is
closed at once; the mapping keeps its private dup, which holds no lock), and
once for the locks. After fork, the child closes its inherited lock
descriptor and opens its own (``reopen``): otherwise a parent killed first
would stay "alive" for as long as the child lives.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import secrets
import struct
import sys
import time

try:
    import _posixshmem  # type: ignore[import-not-found]  # multiprocessing's, no stubs
except ImportError:  # pragma: no cover - platforms without POSIX shared memory
    _posixshmem = None

__all__ = [
    "available",
    "check_name",
    "create",
    "exists",
    "held_elsewhere",
    "lock",
    "new_name",
    "open_existing",
    "open_lock_fd",
    "try_lock",
    "unlink",
    "unlock",
]

#: Where the lock ranges start: far past any segment's end, so that no lock
#: covers data (locks on a range past EOF are allowed and cost nothing).
LOCK_BASE = 1 << 40

#: The longest name accepted (the table of pending unlinks stores names).
MAX_NAME = 100

_FLOCK = struct.Struct("hhqqi4x")  # struct flock on Linux (x86-64 and aarch64)


def available() -> str | None:
    """None when this platform has what the shared structures need, else why not."""
    if not sys.platform.startswith("linux"):
        return f"SharedDomain needs Linux (open-file-description locks); this is {sys.platform}"
    if _posixshmem is None:
        return "SharedDomain needs POSIX shared memory (_posixshmem), which this Python lacks"
    if not hasattr(fcntl, "F_OFD_SETLK"):
        return "SharedDomain needs fcntl.F_OFD_SETLK (Linux >= 3.15, Python >= 3.9)"
    return None


def new_name(prefix: str = "qsbr_") -> str:
    """A fresh segment name (12 random hex digits: never reused in practice)."""
    return prefix + secrets.token_hex(6)


def check_name(name: object, what: str = "name") -> str:
    """``name`` as a segment name, or TypeError/ValueError saying what is wrong."""
    if not isinstance(name, str):
        raise TypeError(f"{what} must be a str (a shared-memory segment name), not {type(name).__name__}")
    bare = name[1:] if name.startswith("/") else name
    if not bare or "/" in bare or "\0" in bare or len(bare.encode()) > MAX_NAME:
        raise ValueError(
            f"{what} {name!r} is not a valid shared-memory name: use 1 to {MAX_NAME} bytes with no '/' "
            "(as multiprocessing.shared_memory.SharedMemory(name).name gives)"
        )
    return bare


def _shm_open(name: str, flags: int, mode: int = 0o600) -> int:
    assert _posixshmem is not None
    fd: int = _posixshmem.shm_open("/" + name, flags, mode=mode)
    return fd


def create(name: str, size: int) -> mmap.mmap:
    """Make segment ``name`` of ``size`` zero bytes and map it. FileExistsError if it exists."""
    fd = _shm_open(name, os.O_CREAT | os.O_EXCL | os.O_RDWR)
    try:
        os.ftruncate(fd, size)
        return mmap.mmap(fd, size)
    except BaseException:
        unlink(name)
        raise
    finally:
        os.close(fd)


def open_existing(name: str, *, writable: bool = True) -> mmap.mmap:
    """Map existing segment ``name`` whole. FileNotFoundError if there is none."""
    fd = _shm_open(name, os.O_RDWR if writable else os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        deadline = time.monotonic() + 2.0
        while size == 0 and time.monotonic() < deadline:  # its creator has not sized it yet
            time.sleep(0.001)
            size = os.fstat(fd).st_size
        if size == 0:
            raise ValueError(f"shared-memory segment {name!r} is empty: it is not a qsbr segment")
        return mmap.mmap(fd, size, access=mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ)
    finally:
        os.close(fd)


def open_lock_fd(name: str) -> int:
    """A descriptor of segment ``name`` of its own (a new open file description), for locks."""
    return _shm_open(name, os.O_RDWR)


def exists(name: str) -> bool:
    try:
        os.close(_shm_open(name, os.O_RDONLY))
    except FileNotFoundError:
        return False
    return True


def unlink(name: str) -> bool:
    """Remove segment ``name``; False if it was already gone (names are never reused)."""
    assert _posixshmem is not None
    try:
        _posixshmem.shm_unlink("/" + name)
    except FileNotFoundError:
        return False
    return True


def _flock(kind: int, offset: int) -> bytes:
    return _FLOCK.pack(kind, os.SEEK_SET, LOCK_BASE + offset, 1, 0)


def lock(fd: int, offset: int) -> None:
    """Take lock ``offset`` of ``fd``'s file, waiting for it (no timeout: holders
    hold it only briefly, and a dead holder's lock is dropped by the kernel)."""
    fcntl.fcntl(fd, fcntl.F_OFD_SETLKW, _flock(fcntl.F_WRLCK, offset))


def try_lock(fd: int, offset: int) -> bool:
    """Take lock ``offset`` if nobody else holds it."""
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _flock(fcntl.F_WRLCK, offset))
    except (BlockingIOError, PermissionError):
        return False
    return True


def unlock(fd: int, offset: int) -> None:
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _flock(fcntl.F_UNLCK, offset))


def held_elsewhere(fd: int, offset: int) -> bool:
    """Whether another open file description (another process, or another
    object of this one) holds lock ``offset``; never true of a lock ``fd`` holds itself."""
    answer = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, _flock(fcntl.F_WRLCK, offset))
    return bool(_FLOCK.unpack(answer)[0] != fcntl.F_UNLCK)
