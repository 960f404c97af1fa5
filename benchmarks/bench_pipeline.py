"""A network-ingest pipeline: frames from a socket, checksummed by worker threads.

A sender process streams frames (an 8-byte header: length and crc32, then
the payload) over a socketpair. The receiving thread hands each frame to one
of two worker threads, which check its crc32. Three ways to receive:

* ``pool``: qsbr.BufferPool framing. recv_into() a 64 KiB block (bigger
  for frames that do not fit twice), cut it into frames with pool.slice(),
  and give the block's own view back; each worker releases its frame when it
  is done, and the block is reused after a grace period once every frame is
  back. Workers are registered, report a quiescent state after each frame
  and are detached while they wait for work. One system call per block.
* ``bytearray``: a fresh bytearray per frame, recv_into() it.
* ``recv``: sock.recv(n) per frame, into bytes.

We count frames per second (and check every crc: a bad one fails the run).
Targets (docs/benchmarks.md): pool >= both others at every frame size up to
16 KiB, in pure Python.

Run:  qsbr bench pipeline     (QSBR_BENCH_QUICK=1 for a smoke run)
"""

from __future__ import annotations

import os
import queue
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import qsbr  # noqa: E402
from _common import QUICK, machine, write_json  # noqa: E402

SIZES = [64, 256, 1024, 4096, 16384, 65536]
SECONDS = 0.4 if QUICK else 1.0
ROUNDS = 1 if QUICK else 3
WORKERS = 2
HEADER = struct.Struct("<II")
BATCH = 64  # frames handed to a worker at once
QUEUE_BATCHES = 16  # batches in flight between the receiver and the workers

SENDER = r"""
import os, socket, struct, sys, zlib
fd, size = int(sys.argv[1]), int(sys.argv[2])
sock = socket.socket(fileno=fd)
frames = []
total = 0
while total < (4 << 20) or len(frames) < 64:
    payload = os.urandom(size)
    frames.append(struct.pack("<II", size, zlib.crc32(payload)) + payload)
    total += size + 8
chunk = memoryview(b"".join(frames))
try:
    while True:
        sock.sendall(chunk)
except OSError:
    pass
"""


def start_sender(size: int) -> tuple[socket.socket, subprocess.Popen[bytes]]:
    a, b = socket.socketpair()
    for s in (a, b):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    proc = subprocess.Popen([sys.executable, "-c", SENDER, str(b.fileno()), str(size)], pass_fds=[b.fileno()])
    b.close()
    return a, proc


def recv_exact(sock: socket.socket, buf: Any, n: int) -> None:
    got = sock.recv_into(buf, n, socket.MSG_WAITALL)
    view = memoryview(buf)
    while got < n:
        r = sock.recv_into(view[got:], n - got)
        if r == 0:
            raise EOFError
        got += r


class Run:
    """One variant at one frame size: the receiver and the workers."""

    def __init__(self, variant: str, size: int) -> None:
        self.variant, self.size = variant, size
        self.domain = qsbr.Domain()
        block = 65536 if 2 * (size + 8) <= 65536 else 1 << (2 * (size + 8) - 1).bit_length()
        self.block = block
        self.pool = qsbr.BufferPool(
            (64, 256, 1024, 4096, 16384, 65536, block), page_size=max(1 << 20, block), domain=self.domain
        )
        # Bounded, as a real pipeline's would be: a receiver faster than its
        # workers waits instead of piling up frames (and memory) without end.
        self.q: queue.Queue[list[tuple[Any, int]] | None] = queue.Queue(maxsize=QUEUE_BATCHES)
        self.frames = 0
        self.bad = 0
        self.lock = threading.Lock()

    def worker(self) -> None:
        if self.variant == "pool":
            self.worker_pool()
            return
        frames = bad = 0
        while True:
            batch = self.q.get()
            if batch is None:
                break
            for data, crc in batch:  # its own bytes: nothing to protect
                bad += zlib.crc32(data) != crc
            frames += len(batch)
        self.count(frames, bad)

    def worker_pool(self) -> None:
        """A long-lived reader: registered for its life, detached while it
        waits for work (it holds nothing then), a quiescent state after each
        frame. (A read section around a whole batch would hold every block
        released meanwhile until the batch ends: under the GIL, each crc32
        of a large frame gives the GIL away, and the batch can take
        milliseconds, while the receiver carves fresh blocks.)"""
        pool, q = self.pool, self.q
        frames = bad = 0
        handle = self.domain.register()
        quiescent, detached = handle.quiescent, handle.detached
        try:
            while True:
                with detached():
                    batch = q.get()
                if batch is None:
                    break
                for view, crc in batch:
                    bad += zlib.crc32(view) != crc
                    pool.release(view)
                    quiescent()  # done with this frame
                frames += len(batch)
        finally:
            self.domain.unregister()
        self.count(frames, bad)

    def count(self, frames: int, bad: int) -> None:
        with self.lock:
            self.frames += frames
            self.bad += bad

    def receive(self, sock: socket.socket, stop: threading.Event) -> None:
        getattr(self, f"receive_{self.variant}")(sock, stop)

    def receive_pool(self, sock: socket.socket, stop: threading.Event) -> None:
        pool, q, unpack = self.pool, self.q, HEADER.unpack_from
        block_size = self.block
        carry = b""
        batch: list[tuple[Any, int]] = []
        while not stop.is_set():
            block = pool.acquire(block_size)
            filled = len(carry)
            if filled:
                block[:filled] = carry
            filled += sock.recv_into(block[filled:])
            off = 0
            while filled - off >= 8:
                n, crc = unpack(block, off)
                if filled - off - 8 < n:
                    break
                batch.append((pool.slice(block, off + 8, off + 8 + n), crc))
                off += 8 + n
                if len(batch) == BATCH:
                    q.put(batch)
                    batch = []
            carry = bytes(block[off:filled])  # a partial frame: copied to the next block
            pool.release(block)  # the frames keep the block until they are released
        if batch:
            q.put(batch)

    def receive_bytearray(self, sock: socket.socket, stop: threading.Event) -> None:
        q, header = self.q, bytearray(8)
        batch: list[tuple[Any, int]] = []
        while not stop.is_set():
            recv_exact(sock, header, 8)
            n, crc = HEADER.unpack_from(header)
            buf = bytearray(n)
            recv_exact(sock, buf, n)
            batch.append((buf, crc))
            if len(batch) == BATCH:
                q.put(batch)
                batch = []
        if batch:
            q.put(batch)

    def receive_recv(self, sock: socket.socket, stop: threading.Event) -> None:
        q, header = self.q, bytearray(8)
        batch: list[tuple[Any, int]] = []
        while not stop.is_set():
            recv_exact(sock, header, 8)
            n, crc = HEADER.unpack_from(header)
            data = sock.recv(n, socket.MSG_WAITALL)
            while len(data) < n:
                data += sock.recv(n - len(data))
            batch.append((data, crc))
            if len(batch) == BATCH:
                q.put(batch)
                batch = []
        if batch:
            q.put(batch)

    def run(self, seconds: float) -> float:
        sock, proc = start_sender(self.size)
        workers = [threading.Thread(target=self.worker) for _ in range(WORKERS)]
        for w in workers:
            w.start()
        stop = threading.Event()
        receiver = threading.Thread(target=self.receive, args=(sock, stop))
        t0 = time.perf_counter()
        receiver.start()
        time.sleep(seconds)
        stop.set()
        receiver.join(30)
        for _ in workers:
            self.q.put(None)
        for w in workers:
            w.join(30)
        elapsed = time.perf_counter() - t0
        sock.close()
        proc.kill()
        proc.wait(10)
        self.domain.close()
        if self.bad:
            raise SystemExit(f"{self.variant} at {self.size} B: {self.bad} frames with a bad crc32")
        return self.frames / elapsed


def main() -> None:
    variants = ["pool", "bytearray", "recv"]
    results: dict[int, dict[str, list[float]]] = {s: {v: [] for v in variants} for s in SIZES}
    mach = machine()
    print(f"python {mach['python']} ({mach['build']}), {mach['cpus']} cpus, {WORKERS} workers")
    for r in range(ROUNDS):
        for size in SIZES:
            for v in variants:  # interleaved: noise hits all of them alike
                results[size][v].append(Run(v, size).run(SECONDS))
        print(f"  round {r + 1} of {ROUNDS} done", flush=True)
    rows = []
    print(
        f"  {'frame':>7}{'pool /s':>12}{'bytearray /s':>14}{'recv /s':>12}"
        f"{'pool/bytearray':>16}{'pool/recv':>11}"
    )
    for size in SIZES:
        med = {v: statistics.median(results[size][v]) for v in variants}
        row = {
            "frame_bytes": size,
            **{f"{v}_per_s": med[v] for v in variants},
            "pool_vs_bytearray": med["pool"] / med["bytearray"],
            "pool_vs_recv": med["pool"] / med["recv"],
            "samples": {v: results[size][v] for v in variants},
        }
        rows.append(row)
        print(
            f"  {size:>7}{med['pool']:>12,.0f}{med['bytearray']:>14,.0f}{med['recv']:>12,.0f}"
            f"{row['pool_vs_bytearray']:>15.2f}x{row['pool_vs_recv']:>10.2f}x",
            flush=True,
        )
    met = all(
        r["pool_vs_bytearray"] >= 1 and r["pool_vs_recv"] >= 1 for r in rows if r["frame_bytes"] <= 16384
    )
    print(f"  target (pool >= both, frames up to 16 KiB): {'met' if met else 'MISSED'}")
    path = write_json(
        "pipeline",
        {"rows": rows, "seconds": SECONDS, "rounds": ROUNDS, "workers": WORKERS, "target_met": met},
    )
    print(f"  wrote {path}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
