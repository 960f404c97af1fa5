"""Across processes: SharedCell against the other ways to share a value.

Reader processes read one published value (64 B, 4 KiB, 64 KiB) as fast as
they can while the parent's writer thread replaces it every millisecond:

* ``qsbr``: SharedCell.read() (a zero-copy view; one byte of it touched) and
  the reader's quiescent();
* ``manager``: multiprocessing.Manager().dict()["k"] (a round trip to the
  manager process);
* ``ultradict``: UltraDict["k"] (PyPI ``UltraDict``);
* ``shared_memory_dict``: SharedMemoryDict["k"] (PyPI ``shared-memory-dict``).

A peer that cannot be installed is skipped, and the output says so. For each
peer, size and number of reader processes (1, 2, 4): reads/s (all readers
together, over the first half of the run) and the p50/p99 of one read (each
read timed, over the second half). Then each peer's publish latency (the
writer's median and p99 with one reader running), and what /dev/shm holds
after a writer process is SIGKILLed in the middle of writing 64 KiB values
and the survivor has cleaned up with the peer's own API.

Targets (docs/benchmarks.md, issue 14): SharedCell reads >= 10x Manager and
>= every other peer at every size and reader count; nothing left in /dev/shm
after any kill.

Run:  qsbr bench shared     (QSBR_BENCH_QUICK=1 for a smoke run)
Writes results/shared-<build>.json and, with matplotlib, results/shared-<build>.png.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import QUICK, RESULTS, build_tag, write_json  # noqa: E402

SIZES = (64, 4096, 65536)
READERS = (1, 2, 4)
SECONDS = 0.5 if QUICK else 2.0
DICT_BYTES = 4 << 20  # room for UltraDict / SharedMemoryDict values and their update streams


def available_peers() -> tuple[list[str], dict[str, str]]:
    peers, skipped = ["qsbr", "manager"], {}
    import qsbr

    if qsbr.implementation != "native":
        peers.remove("qsbr")
        skipped["qsbr"] = "SharedCell needs the native kernel"
    try:
        import UltraDict  # noqa: F401

        peers.append("ultradict")
    except ImportError as exc:
        skipped["ultradict"] = f"not installed ({exc}): pip install UltraDict"
    try:
        import shared_memory_dict  # noqa: F401

        peers.append("shared_memory_dict")
    except ImportError as exc:
        skipped["shared_memory_dict"] = f"not installed ({exc}): pip install shared-memory-dict"
    return peers, skipped


# -- the structures: made in the parent, opened in the readers ----------------------------


def make(kind: str, manager: Any) -> tuple[Any, Any, Callable[[bytes], Any], Callable[[], None]]:
    """(shared object, what a reader needs to open it, publish, cleanup)."""
    if kind == "qsbr":
        import qsbr

        cell = qsbr.SharedCell(create=True, capacity=4 << 20)

        def cleanup() -> None:
            cell.close()
            cell.unlink()

        return cell, cell.name, cell.publish, cleanup
    if kind == "manager":
        d = manager.dict()
        return d, d, lambda v: d.__setitem__("k", v), lambda: None
    if kind == "ultradict":
        from UltraDict import UltraDict

        name = f"qsbr_bench_u{os.getpid()}"
        u = UltraDict(name=name, create=True, buffer_size=DICT_BYTES, full_dump_size=DICT_BYTES)
        return u, name, lambda v: u.__setitem__("k", v), u.unlink
    if kind == "shared_memory_dict":
        from shared_memory_dict import SharedMemoryDict

        name = f"qsbr_bench_s{os.getpid()}"
        s = SharedMemoryDict(name=name, size=DICT_BYTES)

        def cleanup_smd() -> None:
            s.shm.close()
            s.shm.unlink()

        return s, name, lambda v: s.__setitem__("k", v), cleanup_smd
    raise ValueError(kind)


def reader_op(kind: str, handle: Any) -> Callable[[], Any]:
    if kind == "qsbr":
        import qsbr

        cell = qsbr.SharedCell(handle)
        h = cell.domain.register()
        read, quiescent = cell.read, h.quiescent

        def op_qsbr() -> None:
            v = read()
            if len(v):
                v[-1]
            quiescent()

        # Between runs a reader waits for orders: detached, as any QSBR
        # reader that blocks must be (an attached idle reader would hold
        # every grace period, and the writer's arena, until it came back).
        op_qsbr.pause = h.detach  # type: ignore[attr-defined]
        op_qsbr.resume = h.attach  # type: ignore[attr-defined]
        op_qsbr.close = cell.close  # type: ignore[attr-defined]
        return op_qsbr
    if kind == "manager":
        return lambda: handle["k"]
    if kind == "ultradict":
        from UltraDict import UltraDict

        u = UltraDict(name=handle)
        return lambda: u["k"]
    if kind == "shared_memory_dict":
        from shared_memory_dict import SharedMemoryDict

        s = SharedMemoryDict(name=handle, size=DICT_BYTES)
        return lambda: s["k"]
    raise ValueError(kind)


def reader_worker(kind: str, handle: Any, conn: Any) -> None:
    op = reader_op(kind, handle)
    pause, resume = getattr(op, "pause", None), getattr(op, "resume", None)
    if pause is not None:
        pause()
    conn.send("ready")
    while True:
        msg = conn.recv()
        if msg is None:
            break
        if resume is not None:
            resume()
        seconds = float(msg)
        # Throughput: untimed reads for the first half.
        n = 0
        t0 = time.perf_counter()
        end = t0 + seconds / 2
        while True:
            for _ in range(64):
                op()
            n += 64
            if time.perf_counter() >= end:
                break
        elapsed = time.perf_counter() - t0
        # Latency: each read timed, for the second half.
        lat: list[int] = []
        clock = time.perf_counter_ns
        end_ns = clock() + int(seconds / 2 * 1e9)
        while len(lat) < 2_000_000:
            a = clock()
            op()
            b = clock()
            lat.append(b - a)
            if b >= end_ns:
                break
        if pause is not None:
            pause()
        lat.sort()
        conn.send((n, elapsed, lat[len(lat) // 2], lat[int(len(lat) * 0.99)]))
    close = getattr(op, "close", None)
    if close is not None:
        close()  # leave the domain (a reader that just exits is evicted: a WARNING)
    conn.send("bye")


def writer_loop(
    publish: Callable[[bytes], Any], values: list[bytes], stop: threading.Event, lat: list[int]
) -> None:
    i = 0
    while not stop.is_set():
        a = time.perf_counter_ns()
        publish(values[i & 1])
        lat.append(time.perf_counter_ns() - a)
        i += 1
        time.sleep(0.001)


def measure_peer(kind: str, ctx: Any, manager: Any) -> dict[str, Any]:
    obj, handle, publish, cleanup = make(kind, manager)
    out: dict[str, Any] = {"reads": {}, "publish": {}}
    try:
        publish(b"\0" * SIZES[0])
        pipes, procs = [], []
        for _ in range(max(READERS)):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=reader_worker, args=(kind, handle, child), daemon=True)
            p.start()
            pipes.append(parent)
            procs.append(p)
        for conn in pipes:
            if not conn.poll(120) or conn.recv() != "ready":
                raise RuntimeError(f"{kind}: a reader did not start")
        for size in SIZES:
            values = [bytes([1]) * size, bytes([2]) * size]
            for n in READERS:
                stop = threading.Event()
                publish_lat: list[int] = []
                writer = threading.Thread(target=writer_loop, args=(publish, values, stop, publish_lat))
                writer.start()
                try:
                    for conn in pipes[:n]:
                        conn.send(SECONDS)
                    results = []
                    for conn in pipes[:n]:
                        if not conn.poll(SECONDS * 20 + 60):
                            raise RuntimeError(f"{kind}: a reader did not report")
                        results.append(conn.recv())
                finally:
                    stop.set()
                    writer.join(60)
                reads_per_s = sum(r[0] / r[1] for r in results)
                out["reads"][f"{size}/{n}"] = {
                    "reads_per_s": reads_per_s,
                    "p50_ns": statistics.median(r[2] for r in results),
                    "p99_ns": max(r[3] for r in results),
                }
                print(
                    f"  {kind:<19} {size:>6} B  {n} reader(s)  {reads_per_s:>12,.0f} reads/s  "
                    f"p50 {statistics.median(r[2] for r in results):>8,.0f} ns  "
                    f"p99 {max(r[3] for r in results):>10,.0f} ns",
                    flush=True,
                )
                if n == 1 and publish_lat:
                    publish_lat.sort()
                    out["publish"][str(size)] = {
                        "p50_ns": publish_lat[len(publish_lat) // 2],
                        "p99_ns": publish_lat[int(len(publish_lat) * 0.99)],
                        "count": len(publish_lat),
                    }
        for conn in pipes:
            conn.send(None)
        for p in procs:
            p.join(30)
    finally:
        for p in procs if "procs" in locals() else []:
            if p.is_alive():
                p.kill()
        cleanup()
    return out


# -- a writer killed mid-write: what does /dev/shm keep? --------------------------------------


def killed_writer(kind: str, conn: Any) -> None:
    value = os.urandom(65536)
    if kind == "qsbr":
        import qsbr

        cell = qsbr.SharedCell(create=True, capacity=65536)  # every value in a segment of its own
        conn.send(cell.name)
        while True:
            cell.publish(value)
    elif kind == "ultradict":
        from UltraDict import UltraDict

        name = f"qsbr_bench_ku{os.getpid()}"
        u = UltraDict(name=name, create=True, buffer_size=DICT_BYTES, full_dump_size=DICT_BYTES)
        conn.send(name)
        while True:
            u["k"] = value
    elif kind == "shared_memory_dict":
        from shared_memory_dict import SharedMemoryDict

        name = f"qsbr_bench_ks{os.getpid()}"
        s = SharedMemoryDict(name=name, size=DICT_BYTES)
        conn.send(name)
        while True:
            s["k"] = value
    elif kind == "manager":
        m = mp.get_context("spawn").Manager()
        d = m.dict()
        conn.send("manager")
        while True:
            d["k"] = value


def survivor_cleanup(kind: str, name: str) -> str:
    """The survivor opens what the dead writer made and removes it with the
    peer's own API; returns what happened."""
    if kind == "qsbr":
        import qsbr

        cell = qsbr.SharedCell(name)
        cell.domain.register()
        cell.publish(b"after")  # finishes or undoes the dead writer's publish
        ok = bytes(cell.read()) == b"after"
        cell.close()
        cell.unlink()
        return "reopened, published, unlinked" if ok else "reopened, but read back the wrong value"
    if kind == "ultradict":
        from UltraDict import UltraDict

        u = UltraDict(name=name)
        u["k"] = b"after"
        u.unlink()
        return "reopened, written, unlinked"
    if kind == "shared_memory_dict":
        from shared_memory_dict import SharedMemoryDict

        s = SharedMemoryDict(name=name, size=DICT_BYTES)
        s["k"] = b"after"
        s.shm.close()
        s.shm.unlink()
        return "reopened, written, unlinked"
    return "nothing to reopen (the dict lived in the dead writer's manager process)"


def kill_test(kind: str, ctx: Any) -> dict[str, Any]:
    before = set(os.listdir("/dev/shm"))
    parent, child = ctx.Pipe()
    p = ctx.Process(target=killed_writer, args=(kind, child))  # not daemonic: a Manager starts a child
    p.start()
    if not parent.poll(120):
        p.kill()
        return {"result": "the writer did not start"}
    name = parent.recv()
    time.sleep(0.3)  # writing
    assert p.pid is not None
    os.kill(p.pid, signal.SIGKILL)
    p.join(10)
    time.sleep(0.5)  # a resource tracker, if any, notices its process died
    result: dict[str, Any] = {}
    holder: list[str] = []

    def clean() -> None:
        try:
            holder.append(survivor_cleanup(kind, name))
        except BaseException as exc:  # report what the peer does, whatever it is
            holder.append(f"failed: {type(exc).__name__}: {exc}")

    t = threading.Thread(target=clean, daemon=True)
    t.start()
    t.join(20)
    result["survivor"] = holder[0] if holder else "stuck for 20 s (a lock held by the dead writer?)"
    time.sleep(0.2)
    # Only what this peer's writer made: the names it was given, and (UltraDict)
    # the multiprocessing semaphores it leaks (on Linux a live SemLock's name is
    # unlinked at creation, so a visible sem.mp-* is a dead creator's). Other
    # programs' segments made meanwhile are neither counted nor removed.
    left = sorted(
        n
        for n in set(os.listdir("/dev/shm")) - before
        if (name != "manager" and name[:40] in n) or (kind == "ultradict" and n.startswith("sem.mp-"))
    )
    result["left_in_dev_shm"] = left
    print(
        f"  {kind:<19} killed writer: survivor {result['survivor']}; /dev/shm keeps {len(left)}: {left}",
        flush=True,
    )
    for n in left:  # leave the machine as we found it
        try:
            os.unlink(f"/dev/shm/{n}")
        except OSError:
            pass
    return result


def plot(payload: dict[str, Any], tag: str | None = None) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, len(READERS), figsize=(4 * len(READERS), 3.6), sharey=True)
    for ax, n in zip(axes, READERS, strict=True):
        for kind, res in payload["peers"].items():
            ys = [res["reads"][f"{size}/{n}"]["reads_per_s"] for size in SIZES]
            ax.plot([str(s) for s in SIZES], ys, marker="o", label=kind)
        ax.set_yscale("log")
        ax.set_title(f"{n} reader process{'es' if n > 1 else ''}")
        ax.set_xlabel("value bytes")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("reads/s (all readers)")
    axes[-1].legend(fontsize=8)
    fig.suptitle(f"A value shared across processes ({tag or build_tag()})")
    fig.tight_layout()
    path = RESULTS / f"shared-{tag or build_tag()}.png"
    RESULTS.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def main() -> None:
    peers, skipped = available_peers()
    only = os.environ.get("QSBR_BENCH_PEERS")  # e.g. "qsbr,ultradict" for a partial run
    if only:
        peers = [p for p in peers if p in only.split(",")]
    for kind, why in skipped.items():
        print(f"  skipped {kind}: {why}", flush=True)
    ctx = mp.get_context("spawn")
    payload: dict[str, Any] = {
        "seconds": SECONDS,
        "sizes": SIZES,
        "readers": READERS,
        "skipped": skipped,
        "peers": {},
    }
    with ctx.Manager() as manager:
        for kind in peers:
            payload["peers"][kind] = measure_peer(kind, ctx, manager)
    print("  publish latency (1 reader running):", flush=True)
    for kind in peers:
        row = "  ".join(
            f"{size} B p50 {v['p50_ns'] / 1000:,.1f} us p99 {v['p99_ns'] / 1000:,.1f} us"
            for size, v in payload["peers"][kind]["publish"].items()
        )
        print(f"    {kind:<19} {row}", flush=True)
    payload["killed_writer"] = {kind: kill_test(kind, ctx) for kind in peers}
    if "qsbr" in peers:
        ratios = {}
        for key, q in payload["peers"]["qsbr"]["reads"].items():
            others = {k: r["reads"][key]["reads_per_s"] for k, r in payload["peers"].items() if k != "qsbr"}
            ratios[key] = {k: q["reads_per_s"] / v for k, v in others.items()}
        payload["ratios"] = ratios
        for peer in sorted({k for r in ratios.values() for k in r}):
            worst = min(r[peer] for r in ratios.values())
            target = 10 if peer == "manager" else 1
            verdict = "met" if worst >= target else "MISSED"
            print(f"  qsbr reads / {peer}: {worst:,.2f}x at worst (target {target}x: {verdict})")
    path = write_json("shared", payload)
    print(f"  wrote {path}")
    png = plot(payload)
    print(f"  wrote {png}" if png else "  (no plot: matplotlib is not installed: pip install 'qsbr[plot]')")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--plot":
        # Plot a result written by another interpreter (matplotlib may not
        # install there): bench_shared.py --plot results/shared-<build>.json
        import json

        source = Path(sys.argv[2])
        print(f"  wrote {plot(json.loads(source.read_text()), source.stem.removeprefix('shared-'))}")
    else:
        main()
