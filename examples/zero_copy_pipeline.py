"""A zero-copy pipeline through qsbr.BufferPool, and the same with a naive pool.

Part 1, framing: a sender writes length-prefixed frames to a socketpair.
The receiver recv_into()s a 64 KiB pooled block at a time, cuts it into
frames with pool.slice(), hands each frame to a worker thread, and gives
the block's own view back; a worker checks its frame's checksum inside a
read section and releases it. The block is reused, after a grace period,
once every frame of it is back: one system call and one block for many
frames.

Part 2, reuse: a producer fills pooled buffers and hands views of them to
consumer threads. A consumer hands the buffer back to the pool as soon as it has
taken it (the next stage "owns" it now), and goes on reading the view for a
while, as a slow sink or a tensor that still references the memory would.

* With qsbr.BufferPool, release() means "reuse it once every reader has
  passed a quiescent state": the consumer reports one after it is done, so
  the block is never overwritten under it.
* With a naive pool that recycles a block as soon as it is released, the
  producer overwrites blocks that consumers are still reading. Checksums
  catch it (spdl#1636 saw 53 of 78 items corrupted this way).

Run:  python examples/zero_copy_pipeline.py
"""

from __future__ import annotations

import os
import queue
import socket
import struct
import threading
import time
import zlib
from typing import Any

import qsbr

ITEMS = 2000
SIZE = 4096


class NaivePool:
    """Recycles a buffer the moment it is released."""

    def __init__(self) -> None:
        self._free: list[bytearray] = []
        self._lock = threading.Lock()
        self._views: dict[int, bytearray] = {}

    def acquire(self, nbytes: int) -> memoryview:
        with self._lock:
            buf = self._free.pop() if self._free else bytearray(nbytes)
            view = memoryview(buf)
            self._views[id(view)] = buf
            return view

    def release(self, view: memoryview) -> None:
        with self._lock:
            self._free.append(self._views.pop(id(view)))


def fill(view: memoryview, item: int) -> int:
    pattern = item.to_bytes(4, "little") * (len(view) // 4)
    view[:] = pattern
    return zlib.crc32(pattern)


def run(pool: Any, domain: qsbr.Domain) -> int:
    q: queue.Queue[tuple[int, int, memoryview] | None] = queue.Queue(maxsize=8)
    corrupted = [0]
    lock = threading.Lock()

    def consumer() -> None:
        with domain.registered():
            while True:
                with domain.detached():  # waiting for work holds nothing
                    item = q.get()
                if item is None:
                    return
                k, crc, view = item
                pool.release(view)  # handed back: reused once we are quiescent
                # ... but the slow sink still reads the view, in pieces.
                parts = []
                for off in range(0, SIZE, 512):
                    parts.append(bytes(view[off : off + 512]))
                    time.sleep(0)
                if zlib.crc32(b"".join(parts)) != crc:
                    with lock:
                        corrupted[0] += 1
                del view
                domain.quiescent()  # done with everything we read

    threads = [threading.Thread(target=consumer) for _ in range(2)]
    for t in threads:
        t.start()
    for k in range(ITEMS):
        v = pool.acquire(SIZE)
        q.put((k, fill(v, k), v))
    for _ in threads:
        q.put(None)
    for t in threads:
        t.join()
    return corrupted[0]


HEADER = struct.Struct("<II")  # frame length, crc32 of the payload
FRAMES = 20_000


def framing(domain: qsbr.Domain) -> tuple[int, int, int]:
    """Part 1. Returns (frames checked, bad checksums, blocks received into)."""
    pool = qsbr.BufferPool(domain=domain)
    rx, tx = socket.socketpair()
    frames: queue.SimpleQueue[tuple[memoryview, int] | None] = queue.SimpleQueue()
    counts = {"frames": 0, "bad": 0, "blocks": 0}
    lock = threading.Lock()

    def sender() -> None:
        sizes = [64, 200, 1500, 9000]
        with tx:
            for k in range(FRAMES):
                payload = os.urandom(sizes[k % len(sizes)])
                tx.sendall(HEADER.pack(len(payload), zlib.crc32(payload)) + payload)

    def worker() -> None:
        ok = bad = 0
        while (item := frames.get()) is not None:
            frame, crc = item
            with domain.attached():  # reading a pooled frame: a read section
                if zlib.crc32(frame) == crc:
                    ok += 1
                else:
                    bad += 1
                pool.release(frame)  # its block is reused once all its frames are back
        with lock:
            counts["frames"] += ok + bad
            counts["bad"] += bad

    workers = [threading.Thread(target=worker) for _ in range(2)]
    for t in (*workers, threading.Thread(target=sender)):
        t.start()
    carry = b""
    with rx:
        while True:
            block = pool.acquire(65536)  # one system call fills it with many frames
            counts["blocks"] += 1
            filled = len(carry)
            block[:filled] = carry
            got = rx.recv_into(block[filled:])
            filled += got
            off = 0
            while filled - off >= HEADER.size:
                n, crc = HEADER.unpack_from(block, off)
                if filled - off - HEADER.size < n:
                    break  # the rest of this frame is in the next block
                start = off + HEADER.size
                frames.put((pool.slice(block, start, start + n), crc))
                off = start + n
            carry = bytes(block[off:filled])
            pool.release(block)  # the frames keep the block out until they are released
            if not got:
                break
    for _ in workers:
        frames.put(None)
    for t in workers:
        t.join()
    return counts["frames"], counts["bad"], counts["blocks"]


def main() -> None:
    domain = qsbr.Domain()
    checked, bad, blocks = framing(domain)
    print(f"framing: {checked:,} frames from {blocks:,} blocks, {bad} bad checksums")
    if checked != FRAMES or bad:
        raise SystemExit("framing lost or corrupted a frame: this is a bug")
    safe = run(qsbr.BufferPool(domain=domain), domain)
    naive = run(NaivePool(), domain)
    print(f"qsbr.BufferPool: {safe} of {ITEMS} items corrupted")
    print(f"naive pool:      {naive} of {ITEMS} items corrupted")
    if safe:
        raise SystemExit("qsbr.BufferPool let a block be reused under a reader: this is a bug")


if __name__ == "__main__":
    main()
