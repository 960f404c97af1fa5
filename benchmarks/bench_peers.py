"""qsbr's structures against every Python peer, side by side in one run.

1. Read cost, one thread, ns per read: a plain attribute, Cell.value,
   Cell.get(), a threading.Lock-protected read, readerwriterlock's RWLock,
   ft_utils.AtomicReference.get(), cereggii.AtomicRef.get(). A peer that is
   not installed is skipped, and the output says so.
   Targets: Cell.value within 1.2x of the plain attribute, and at least 3x
   faster than the Lock-protected read.
2. Hot swap: reader threads serve requests (16 lookups in the current
   resource) while a writer swaps the resource every millisecond; the old
   one must be closed once its readers are done, and a reader that sees a
   closed resource is counted as a violation. Reader throughput and
   per-request p50/p99, per reader count, for: qsbr (Cell + quiescent()),
   Lock, RWLock (requests under the lock; the writer closes at once), and
   AtomicReference / AtomicRef with close() left to refcounting
   (weakref.finalize). Targets: qsbr's throughput at least, and its p99 at
   most, every peer's (judged on "qsbr", quiescent after every request; a
   second row quiesces after every 16th, the knob a service has).
3. retire() + release per object, amortized (as bench_core).
4. BufferPool acquire + release against a fresh bytearray per buffer.

Run:  qsbr bench peers   (make bench runs every benchmark; PYTHON=... for
another interpreter). Writes results/peers-<build>.json and, with
matplotlib, results/peers-<build>.png; `python benchmarks/bench_peers.py
--plot results/peers-<build>.json` draws one from another build's JSON.
"""

from __future__ import annotations

import statistics
import sys
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import qsbr  # noqa: E402
from _common import (  # noqa: E402
    QUICK,
    RESULTS,
    build_tag,
    fresh_bytearrays,
    interleaved,
    kernels,
    machine,
    pool_cycles,
    write_json,
)

try:
    from readerwriterlock import rwlock
except ImportError:
    rwlock = None
try:
    from ft_utils.concurrency import AtomicReference
except ImportError:
    AtomicReference = None
try:
    import cereggii
except ImportError:
    cereggii = None

MISSING = {
    "readerwriterlock": rwlock is None,
    "ft_utils": AtomicReference is None,
    "cereggii": cereggii is None,
}


class Holder:
    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


# -- 1. read cost ------------------------------------------------------------


def read_costs(n: int, repeats: int) -> dict[str, dict[str, float]]:
    payload = object()
    plain = Holder(payload)
    domain = qsbr.Domain(stall_timeout=None)
    cell = qsbr.Cell(payload, domain=domain)
    lock = threading.Lock()
    cases: dict[str, Callable[[int], float]] = {}

    def plain_attribute(n: int) -> float:
        h = plain
        t = time.perf_counter()
        for _ in range(n):
            h.value  # noqa: B018 - the read is what we time
        return time.perf_counter() - t

    def cell_value(n: int) -> float:
        c = cell
        t = time.perf_counter()
        for _ in range(n):
            c.value  # noqa: B018
        return time.perf_counter() - t

    def cell_get(n: int) -> float:
        c = cell
        t = time.perf_counter()
        for _ in range(n):
            c.get()
        return time.perf_counter() - t

    def lock_read(n: int) -> float:
        h, lk = plain, lock
        t = time.perf_counter()
        for _ in range(n):
            with lk:
                h.value  # noqa: B018
        return time.perf_counter() - t

    cases.update(
        {
            "plain_attribute": plain_attribute,
            "cell_value": cell_value,
            "cell_get": cell_get,
            "lock_read": lock_read,
        }
    )
    if rwlock is not None:
        rlock = rwlock.RWLockFair().gen_rlock()

        def rwlock_read(n: int) -> float:
            h, lk = plain, rlock
            t = time.perf_counter()
            for _ in range(n):
                with lk:
                    h.value  # noqa: B018
            return time.perf_counter() - t

        cases["rwlock_read"] = rwlock_read
    if AtomicReference is not None:
        aref = AtomicReference(payload)

        def ft_utils_get(n: int) -> float:
            r = aref
            t = time.perf_counter()
            for _ in range(n):
                r.get()
            return time.perf_counter() - t

        cases["ft_utils_atomicreference_get"] = ft_utils_get
    if cereggii is not None:
        cref = cereggii.AtomicRef(payload)

        def cereggii_get(n: int) -> float:
            r = cref
            t = time.perf_counter()
            for _ in range(n):
                r.get()
            return time.perf_counter() - t

        cases["cereggii_atomicref_get"] = cereggii_get

    def loop(n: int) -> float:
        t = time.perf_counter()
        for _ in range(n):
            pass
        return time.perf_counter() - t

    cases["empty_loop"] = loop
    return interleaved(cases, n, repeats)


# -- 2. hot swap -----------------------------------------------------------------


#: CPU time one close() burns, in ns (P5b sets 200 µs: closing a big mmap or a
#: connection), and how many closes ran on which kind of thread.
CLOSE_COST_NS = 0
CLOSES: dict[str, int] = {}


def _burn(ns: int) -> None:
    end = time.perf_counter_ns() + ns
    while time.perf_counter_ns() < end:
        pass


class Handle:
    """What close() frees; a finalizer may hold it (not the resource)."""

    __slots__ = ("open",)

    def __init__(self) -> None:
        self.open = True

    def close(self) -> None:
        self.open = False
        if CLOSE_COST_NS:
            role = threading.current_thread().name.split("-")[0]
            CLOSES[role] = CLOSES.get(role, 0) + 1
            _burn(CLOSE_COST_NS)


class Resource:
    __slots__ = ("table", "handle", "__weakref__")

    def __init__(self, version: int) -> None:
        self.table = {k: k + version for k in range(64)}
        self.handle = Handle()

    def lookup(self, k: int) -> int:
        if not self.handle.open:
            raise RuntimeError("used after close()")
        return self.table[k]

    def close(self) -> None:
        self.handle.close()


LOOKUPS = 16  # per request (P5a's thin request sets 1)


class Scheme:
    """How readers get the resource and how the writer swaps it."""

    name = ""

    def reader_setup(self) -> Any:
        """Per reader thread; returns what request() gets as ``ctx``."""
        return None

    def reader_teardown(self) -> None: ...

    def request(self, n: int, ctx: Any = None) -> int:
        """Serve the reader's n-th request."""
        raise NotImplementedError

    def swap(self, new: Resource) -> None:
        raise NotImplementedError

    def writer_setup(self) -> None: ...

    def writer_teardown(self) -> None: ...

    def finish(self) -> None: ...


def _serve(r: Resource) -> int:
    s = 0
    for k in range(LOOKUPS):
        s += r.lookup(k)
    return s


class QsbrScheme(Scheme):
    """Readers report a quiescent state after every request through
    domain.quiescent(). The variants below differ only in request(): each
    scheme's request does its own work and nothing else, so no variant
    pays for another's choices (on 3.13t every extra load of a shared
    attribute costs a contended reference count). ``q`` is the qsbr
    package on one kernel (_common.kernels())."""

    name = "qsbr"

    def __init__(self, q: Any = qsbr) -> None:
        self.domain = q.Domain(stall_timeout=None)
        self.cell = q.Cell(Resource(0), Resource.close, domain=self.domain)

    def reader_setup(self) -> Any:
        return self.domain.register()  # this reader's ThreadHandle

    def reader_teardown(self) -> None:
        self.domain.unregister()

    def request(self, n: int, ctx: Any = None) -> int:
        s = _serve(self.cell.value)
        self.domain.quiescent()  # between requests: holds nothing
        return s

    def writer_setup(self) -> None:
        self.domain.register()

    def swap(self, new: Resource) -> None:
        self.cell.set(new)
        self.domain.quiescent()

    def writer_teardown(self) -> None:
        self.domain.unregister()

    def finish(self) -> None:
        self.domain.barrier(timeout=30)
        self.domain.close()


class QsbrHandleScheme(QsbrScheme):
    """The same, through the reader's own ThreadHandle."""

    name = "qsbr_handle"

    def request(self, n: int, ctx: Any = None) -> int:
        s = _serve(self.cell.value)
        ctx.quiescent()
        return s


class QsbrEvery16Scheme(QsbrScheme):
    """A quiescent state after every 16th request."""

    name = "qsbr_quiescent_every_16"

    def request(self, n: int, ctx: Any = None) -> int:
        s = _serve(self.cell.value)
        if not n & 15:
            self.domain.quiescent()
        return s


class LockScheme(Scheme):
    name = "lock"

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.current = Resource(0)

    def request(self, n: int, ctx: Any = None) -> int:
        with self.lock:
            return _serve(self.current)

    def swap(self, new: Resource) -> None:
        with self.lock:
            old, self.current = self.current, new
        old.close()  # no reader can hold it: they read under the lock


class RWLockScheme(Scheme):
    name = "rwlock"

    def __init__(self) -> None:
        lk = rwlock.RWLockFair()
        self.lock = lk
        self.wlock = lk.gen_wlock()
        self.local = threading.local()
        self.current = Resource(0)

    def request(self, n: int, ctx: Any = None) -> int:
        rl = getattr(self.local, "r", None)
        if rl is None:
            rl = self.local.r = self.lock.gen_rlock()
        with rl:
            return _serve(self.current)

    def swap(self, new: Resource) -> None:
        with self.wlock:
            old, self.current = self.current, new
        old.close()


class RefcountScheme(Scheme):
    """An atomic reference; close() runs when the last reference drops."""

    def __init__(self, name: str, ref: Any) -> None:
        self.name = name
        first = Resource(0)
        weakref.finalize(first, first.handle.close)
        self.ref = ref(first)

    def request(self, n: int, ctx: Any = None) -> int:
        return _serve(self.ref.get())

    def swap(self, new: Resource) -> None:
        weakref.finalize(new, new.handle.close)
        self.ref.set(new)


def run_hot_swap(scheme: Scheme, readers: int, seconds: float, time_every: int = 8) -> dict[str, Any]:
    """Readers serve requests while a writer swaps the resource every ms.
    One request in ``time_every`` (a power of two) is timed."""
    stop = threading.Event()
    counts = [0] * readers
    lat: list[list[int]] = [[] for _ in range(readers)]
    violations: list[str] = []
    swaps = [0]
    start_gate = threading.Barrier(readers + 1)
    mask = time_every - 1
    CLOSES.clear()

    def reader(k: int) -> None:
        ctx = scheme.reader_setup()
        start_gate.wait()
        n = 0
        mine = lat[k]
        clock = time.perf_counter_ns
        try:
            while not stop.is_set():
                if n & mask == 0:  # time one request in time_every
                    t0 = clock()
                    scheme.request(n, ctx)
                    mine.append(clock() - t0)
                else:
                    scheme.request(n, ctx)
                n += 1
        except RuntimeError as exc:
            violations.append(str(exc))
        counts[k] = n
        scheme.reader_teardown()

    def writer() -> None:
        scheme.writer_setup()
        v = 0
        start_gate.wait()
        while not stop.is_set():
            v += 1
            scheme.swap(Resource(v))
            swaps[0] += 1
            time.sleep(0.001)
        scheme.writer_teardown()

    threads = [threading.Thread(target=reader, args=(k,), name=f"reader-{k}") for k in range(readers)]
    threads.append(threading.Thread(target=writer, name="writer"))
    for t in threads:
        t.start()
    t0 = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    elapsed = time.perf_counter() - t0
    scheme.finish()
    all_lat = sorted(x for per in lat for x in per)

    def pct(p: float) -> float:
        return float(all_lat[min(len(all_lat) - 1, int(p * len(all_lat)))]) if all_lat else 0.0

    return {
        "readers": readers,
        "requests_per_s": sum(counts) / elapsed,
        "p50_ns": pct(0.50),
        "p99_ns": pct(0.99),
        "p999_ns": pct(0.999),
        "swaps": swaps[0],
        "violations": len(violations),
        "closes_on_readers": CLOSES.get("reader", 0),
        "closes": sum(CLOSES.values()),
    }


def peer_makers() -> dict[str, Callable[[], Scheme]]:
    """Every scheme that is not qsbr's, that is installed here."""
    makers: dict[str, Callable[[], Scheme]] = {"lock": LockScheme}
    if rwlock is not None:
        makers["rwlock"] = RWLockScheme
    if AtomicReference is not None:
        makers["ft_utils_atomicreference"] = lambda: RefcountScheme(
            "ft_utils_atomicreference", AtomicReference
        )
    if cereggii is not None:
        makers["cereggii_atomicref"] = lambda: RefcountScheme("cereggii_atomicref", cereggii.AtomicRef)
    return makers


def qsbr_makers(schemes: tuple[type[QsbrScheme], ...]) -> dict[str, Callable[[], Scheme]]:
    """qsbr's schemes on every kernel available: "qsbr" etc. on the one in
    use, "qsbr...[python]" on the pure one beside the native one."""
    twins = kernels()
    makers: dict[str, Callable[[], Scheme]] = {}
    for tag, q in twins.items():
        suffix = "" if q is qsbr else f"[{tag}]"
        for cls in schemes:
            makers[cls.name + suffix] = lambda cls=cls, q=q: cls(q)
    return makers


ALL_QSBR = (QsbrScheme, QsbrHandleScheme, QsbrEvery16Scheme)


def hot_swap(
    reader_counts: list[int],
    seconds: float,
    rounds: int,
    makers: dict[str, Callable[[], Scheme]] | None = None,
    time_every: int = 8,
) -> dict[str, list[dict[str, Any]]]:
    if makers is None:
        makers = {**qsbr_makers(ALL_QSBR), **peer_makers()}
    out: dict[str, list[dict[str, Any]]] = {name: [] for name in makers}
    for readers in reader_counts:
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in makers}
        for _ in range(rounds):  # interleaved: noise hits every scheme alike
            for name, make in makers.items():
                runs[name].append(run_hot_swap(make(), readers, seconds, time_every))
        for name, rs in runs.items():
            out[name].append(
                {
                    "readers": readers,
                    "requests_per_s": statistics.median(r["requests_per_s"] for r in rs),
                    "best_requests_per_s": max(r["requests_per_s"] for r in rs),
                    "p50_ns": statistics.median(r["p50_ns"] for r in rs),
                    "p99_ns": statistics.median(r["p99_ns"] for r in rs),
                    "p999_ns": statistics.median(r["p999_ns"] for r in rs),
                    "swaps": sum(r["swaps"] for r in rs),
                    "violations": sum(r["violations"] for r in rs),
                    "closes_on_readers": sum(r["closes_on_readers"] for r in rs),
                    "closes": sum(r["closes"] for r in rs),
                    "rounds": len(rs),
                }
            )
    return out


def thin_and_costly(counts: list[int], seconds: float, rounds: int) -> dict[str, Any]:
    """P5a: the hot swap with a thin request (one lookup), best of
    ``rounds``; P5b: with a close() that burns 200 µs of CPU, every request
    timed (p99.9), and where the closes ran."""
    global LOOKUPS, CLOSE_COST_NS
    saved = LOOKUPS, CLOSE_COST_NS
    try:
        LOOKUPS, CLOSE_COST_NS = 1, 0
        thin = hot_swap(counts, seconds, rounds, {**qsbr_makers(ALL_QSBR), **peer_makers()})
        LOOKUPS, CLOSE_COST_NS = 16, 200_000
        costly = hot_swap(
            counts, seconds, rounds, {**qsbr_makers((QsbrHandleScheme,)), **peer_makers()}, time_every=1
        )
    finally:
        LOOKUPS, CLOSE_COST_NS = saved
    return {"thin": thin, "costly_close": costly}


# -- 3 and 4: retire, BufferPool -----------------------------------------------------


def retire_and_pool(n: int, repeats: int) -> dict[str, dict[str, float]]:
    d = qsbr.Domain(stall_timeout=None)
    d.register()
    objs = [object() for _ in range(n)]

    def noop(o: object) -> None:
        pass

    def append_and_call(n: int) -> float:
        lst: list[object] = []
        t = time.perf_counter()
        for o in objs[:n]:
            lst.append(o)
            noop(o)
        return time.perf_counter() - t

    def retire_and_release(n: int) -> float:
        t = time.perf_counter()
        retire = d.retire
        for o in objs[:n]:
            retire(o, noop)
        d.barrier()
        return time.perf_counter() - t

    pool = qsbr.BufferPool(domain=d)
    cases: dict[str, Callable[[int], float]] = {
        "append_and_call": append_and_call,
        "retire_and_release": retire_and_release,
    }
    for size in (64, 4096, 65536):
        cases[f"pool_{size}"] = pool_cycles(pool, d.quiescent, size)
        cases[f"bytearray_{size}"] = fresh_bytearrays(size)
    res = interleaved(cases, n, repeats)
    d.unregister()
    return res


def plot(payload: dict[str, Any], tag: str | None = None) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    reads = payload["read_cost"]
    names = [k for k in reads if k != "empty_loop"]
    axes[0].barh(names, [reads[k]["median_ns"] for k in names])
    axes[0].set_xlabel("ns per read (median)")
    axes[0].set_title("read cost, one thread")
    for name, rows in payload["hot_swap"].items():
        xs = [r["readers"] for r in rows]
        axes[1].plot(xs, [r["requests_per_s"] for r in rows], marker="o", label=name)
        axes[2].plot(xs, [r["p99_ns"] / 1000 for r in rows], marker="o", label=name)
    axes[1].set_title("hot swap: reader throughput")
    axes[1].set_xlabel("reader threads")
    axes[1].set_ylabel("requests/s")
    axes[2].set_title("hot swap: reader p99")
    axes[2].set_xlabel("reader threads")
    axes[2].set_ylabel("µs per request (16 lookups)")
    axes[2].set_yscale("log")
    axes[1].legend(fontsize=8)
    m = payload["machine"]
    fig.suptitle(f"qsbr vs peers: Python {m['python']} ({m['build']}), {m['cpus']} cpus")
    fig.tight_layout()
    path = RESULTS / f"peers-{tag or build_tag()}.png"
    fig.savefig(path, dpi=100)
    return path


def main() -> None:
    m = machine()
    print(f"python {m['python']} ({m['build']}), {m['cpus']} cpus, {m['platform']}")
    for peer, missing in MISSING.items():
        if missing:
            print(f"  skipped: {peer} is not installed for this interpreter")
    n = 200_000 if QUICK else 1_000_000
    repeats = 3 if QUICK else 7
    reads = read_costs(n, repeats)
    for name, r in reads.items():
        print(f"  read  {name:32} median {r['median_ns']:7.1f} ns")
    plain = reads["plain_attribute"]["median_ns"]
    cell = reads["cell_value"]["median_ns"]
    lock = reads["lock_read"]["median_ns"]
    print(f"  Cell.value / plain attribute       {cell / plain:5.2f}x   (target <= 1.2x)")
    print(f"  Lock read / Cell.value             {lock / cell:5.2f}x   (target >= 3x)")

    counts = [1, 2, 4]
    swap = hot_swap(counts, 0.3 if QUICK else 1.0, 1 if QUICK else 3)
    for name, rows in swap.items():
        for r in rows:
            print(
                f"  swap  {name:26} readers {r['readers']}  {r['requests_per_s']:>11,.0f} req/s  "
                f"p50 {r['p50_ns'] / 1000:8.1f} µs  p99 {r['p99_ns'] / 1000:9.1f} µs  "
                f"violations {r['violations']}"
            )
    met_tp, met_p99 = [], []
    for i, readers in enumerate(counts):
        q = swap["qsbr"][i]
        others = [rows[i] for name, rows in swap.items() if not name.startswith("qsbr")]
        met_tp.append(all(q["requests_per_s"] >= o["requests_per_s"] for o in others))
        met_p99.append(all(q["p99_ns"] <= o["p99_ns"] for o in others))
        print(
            f"  readers {readers}: qsbr throughput >= every peer: {met_tp[-1]}; "
            f"qsbr p99 <= every peer: {met_p99[-1]}"
        )

    extra = thin_and_costly(counts, 0.3 if QUICK else 1.0, 1 if QUICK else 3)
    thin, costly = extra["thin"], extra["costly_close"]
    print("  P5a thin request (one lookup): reader throughput, best of the rounds")
    for name, rows in thin.items():
        best = "".join(f" {r['best_requests_per_s']:>12,.0f}" for r in rows)
        print(f"  thin  {name:32}{best}  req/s")
    refcount_peers = [n for n in thin if n.endswith(("atomicreference", "atomicref"))]
    p5a: dict[str, Any] = {}
    for i, readers in enumerate(counts):
        if not refcount_peers:
            break
        best_peer = max(thin[n][i]["best_requests_per_s"] for n in refcount_peers)
        handle = thin["qsbr_handle"][i]["best_requests_per_s"] / best_peer
        every16 = thin["qsbr_quiescent_every_16"][i]["best_requests_per_s"] / best_peer
        p5a[str(readers)] = {"handle_vs_best_peer": handle, "every16_vs_best_peer": every16}
        print(
            f"  readers {readers}: handle.quiescent() per request / best refcount peer {handle:5.3f} "
            f"(target >= 0.95); every 16th / best peer {every16:5.3f} (target >= 1)"
        )
    print("  P5b close() burns 200 µs: reader p99.9, closes run on reader threads")
    for name, rows in costly.items():
        print(
            f"  close {name:32}"
            + "".join(
                f"  r{r['readers']}: p99.9 {r['p999_ns'] / 1000:8.1f} µs, "
                f"{r['closes_on_readers']}/{r['closes']}"
                for r in rows
            )
        )
    p5b: dict[str, Any] = {}
    for i, readers in enumerate(counts):
        q = costly["qsbr_handle"][i]
        row = {"qsbr_closes_on_readers": q["closes_on_readers"]}
        for n in refcount_peers:
            row[f"p999_vs_{n}"] = q["p999_ns"] / costly[n][i]["p999_ns"] if costly[n][i]["p999_ns"] else None
        p5b[str(readers)] = row
        print(f"  readers {readers}: {row}")

    costs = retire_and_pool(20_000 if QUICK else 100_000, repeats)
    for name, r in costs.items():
        print(f"  cost  {name:32} median {r['median_ns']:7.1f} ns")
    ratio_retire = costs["retire_and_release"]["median_ns"] / costs["append_and_call"]["median_ns"]
    print(f"  retire+release / append+call       {ratio_retire:5.2f}x")
    for size in (64, 4096, 65536):
        r = costs[f"pool_{size}"]["median_ns"] / costs[f"bytearray_{size}"]["median_ns"]
        print(f"  BufferPool {size:>6} B / bytearray     {r:5.2f}x")
    payload: dict[str, Any] = {
        "machine": m,
        "skipped_peers": [p for p, missing in MISSING.items() if missing],
        "read_cost": reads,
        "hot_swap": swap,
        "hot_swap_thin": thin,
        "hot_swap_costly_close": costly,
        "p5a": p5a,
        "p5b": p5b,
        "costs": costs,
        "ratios": {
            "cell_value_vs_plain_attribute": cell / plain,
            "lock_read_vs_cell_value": lock / cell,
            "retire_release_vs_append_call": ratio_retire,
        },
        "targets_met": {
            "cell_value_within_1.2x_plain": cell / plain <= 1.2,
            "cell_value_3x_faster_than_lock": lock / cell >= 3,
            "hot_swap_throughput_at_least_every_peer": dict(zip(map(str, counts), met_tp, strict=True)),
            "hot_swap_p99_at_most_every_peer": dict(zip(map(str, counts), met_p99, strict=True)),
        },
    }
    path = write_json("peers", payload)
    print(f"  wrote {path}")
    png = plot(payload)
    print(f"  wrote {png}" if png else "  (no plot: matplotlib is not installed: pip install 'qsbr[plot]')")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--plot":
        # Plot a result written by another interpreter (matplotlib may not
        # install on the free-threaded build): --plot results/peers-TAG.json
        import json

        src = Path(sys.argv[2])
        print(plot(json.loads(src.read_text()), src.stem.removeprefix("peers-")))
    else:
        main()
