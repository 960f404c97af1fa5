"""Core costs, measured side by side in one run (docs/benchmarks.md).

Every case that depends on the kernel runs on both twins in this one process
(the C kernel, and the pure-Python one loaded as a second copy of the
package: _common.kernels()), interleaved with the baselines.

1. Domain.quiescent() and ThreadHandle.quiescent() against an empty method
   call (P1: <= 1.0x, P1h: <= 0.8x on the native kernel).
2. retire() plus its eventual release, amortized per object, against
   appending to a list and calling the release directly (P3: <= 5x).
4. What a server pays per request, `with domain.attached(): pass`, against
   `with lock: pass` on an uncontended threading.Lock (P8: <= 1.0x).
5. BufferPool acquire + a one-byte write + release, quiescent every 64th,
   against bytearray(n) + the same write, 64 B / 4 KiB / 64 KiB (P7: <= 2x,
   <= 1x, <= 0.5x); on the pure kernel the pool runs without its C fast path.
3. The pure-Python floor of both: FloorDomain below does the least that any
   pure-Python domain must do for these two operations, and less than a
   correct one does. Where the floor is over a target, no pure-Python
   implementation meets that target on this interpreter.

Run:  qsbr bench core   (or: make bench; PYTHON=... for another interpreter)
"""

from __future__ import annotations

import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import QUICK, fresh_bytearrays, interleaved, kernels, machine, pool_cycles, write_json  # noqa: E402


class Plain:
    __slots__ = ("x",)

    def empty(self) -> None:
        pass


def noop_release(obj: object) -> None:
    pass


_getsizeof = sys.getsizeof


class FloorState:
    __slots__ = ("seq", "deferrals", "fns", "args", "retired_bytes")

    def __init__(self) -> None:
        self.seq = 0
        self.deferrals = 0
        self.fns: list[Callable[[Any], Any]] = []
        self.args: list[Any] = []
        self.retired_bytes = 0


class FloorDomain:
    """A lower bound, not a domain: it keeps no goals, never scans, takes no
    lock and runs releases in batches of FLOOR_BATCH as if every grace
    period were already over. What it keeps is what no pure-Python domain
    can drop: finding the calling thread's state (a threading.local), one
    load of wr_seq, one store per quiescent state; per retirement, the
    deferred-advance count, the queueing, and the release call itself.
    retire_checked() adds what the API requires at retire() time
    (docs/api.md): the TypeError for a release that is not callable, and the
    default size estimate and its per-thread byte count."""

    __slots__ = ("_tls", "_wr_seq")
    FLOOR_BATCH = 1000

    def __init__(self) -> None:
        self._tls = threading.local()
        self._tls.report_to = FloorState()
        self._wr_seq = 1

    def quiescent(self) -> None:
        self._tls.report_to.seq = self._wr_seq

    def retire(self, obj: Any, release: Callable[[Any], Any]) -> int:
        st = self._tls.report_to
        n = st.deferrals + 1
        if n < self.FLOOR_BATCH:
            st.deferrals = n
            st.fns.append(release)
            st.args.append(obj)
            return self._wr_seq + 2
        st.deferrals = 0
        self.flush()
        release(obj)
        return self._wr_seq

    def retire_checked(self, obj: Any, release: Callable[[Any], Any], size: int | None = None) -> int:
        if not callable(release):
            raise TypeError("release must be callable")
        if size is None:
            size = _getsizeof(obj)  # less than estimate_size(): no nbytes check
        st = self._tls.report_to
        st.retired_bytes += size
        n = st.deferrals + 1
        if n < self.FLOOR_BATCH:
            st.deferrals = n
            st.fns.append(release)
            st.args.append(obj)
            return self._wr_seq + 2
        st.deferrals = 0
        self.flush()
        release(obj)
        return self._wr_seq

    def flush(self) -> None:
        st = self._tls.report_to
        fns, args = st.fns, st.args
        st.fns, st.args = [], []
        for fn, arg in zip(fns, args, strict=True):
            fn(arg)


def check_floor() -> None:
    """The floor is only a fair lower bound if it does the work it claims:
    every retired object is released, once, and quiescent() stores wr_seq.
    Run by the test suite: python benchmarks/bench_core.py --check-floor"""
    floor = FloorDomain()
    released: list[int] = []
    for retire in (floor.retire, floor.retire_checked):
        n = 2 * FloorDomain.FLOOR_BATCH + 7
        for i in range(n):
            retire(i, released.append)
        floor.flush()
        assert sorted(released) == list(range(n)), "the floor lost or repeated a release"
        released.clear()
    try:
        floor.retire_checked(1, "not callable")  # type: ignore[arg-type]
    except TypeError:
        pass
    else:
        raise AssertionError("retire_checked() accepted a release that is not callable")
    floor._wr_seq = 41
    floor.quiescent()
    assert floor._tls.report_to.seq == 41, "quiescent() did not store wr_seq"
    print("floor: every release ran once; quiescent() stores wr_seq")


def kernel_cases(q: Any, tag: str) -> tuple[dict[str, Callable[[int], float]], ...]:
    """The cases that depend on the kernel, for package ``q`` (qsbr on one
    kernel), named ``case[tag]``; and a cleanup callable as the last item."""
    d = q.Domain()
    handle = d.register()

    def quiescent(n: int) -> float:
        t = time.perf_counter()
        for _ in range(n):
            d.quiescent()
        return time.perf_counter() - t

    def handle_quiescent(n: int) -> float:
        h = handle
        t = time.perf_counter()
        for _ in range(n):
            h.quiescent()
        return time.perf_counter() - t

    # What a server pays per request: a read section on a thread that is
    # detached between requests (compared with an uncontended threading.Lock).
    rs = q.Domain()
    rs_handle = rs.register()
    rs.detach()

    def read_section(n: int) -> float:
        attached = rs.attached
        t = time.perf_counter()
        for _ in range(n):
            with attached():
                pass
        return time.perf_counter() - t

    def handle_read_section(n: int) -> float:
        attached = rs_handle.attached
        t = time.perf_counter()
        for _ in range(n):
            with attached():
                pass
        return time.perf_counter() - t

    def attach_quiescent_detach(n: int) -> float:
        attach, quiesce, detach = rs.attach, rs.quiescent, rs.detach
        t = time.perf_counter()
        for _ in range(n):
            attach()
            quiesce()
            detach()
        return time.perf_counter() - t

    # detached() as a context manager against the calls it wraps (the main
    # thread is registered and attached in `d`).
    def detached_section(n: int) -> float:
        detached = d.detached
        t = time.perf_counter()
        for _ in range(n):
            with detached():
                pass
        return time.perf_counter() - t

    def handle_detached_section(n: int) -> float:
        detached = handle.detached
        t = time.perf_counter()
        for _ in range(n):
            with detached():
                pass
        return time.perf_counter() - t

    def detach_attach(n: int) -> float:
        detach, attach = d.detach, d.attach
        t = time.perf_counter()
        for _ in range(n):
            detach()
            attach()
        return time.perf_counter() - t

    # A Cell read, as fast as an attribute, and what debug mode adds.
    plain_cell = q.Cell(1, domain=d)
    debug_domain = q.Domain(debug=True)
    debug_domain.register()
    debug_cell = q.Cell(1, domain=debug_domain)

    def cell_read(cell: Any) -> Callable[[int], float]:
        def case(n: int) -> float:
            c = cell
            t = time.perf_counter()
            for _ in range(n):
                c.value  # noqa: B018 - the read is what we time
            return time.perf_counter() - t

        return case

    shared_array = q.SharedArray("q", pool=q.BufferPool(domain=d))
    shared_array.extend(range(1000))

    def shared_array_read(n: int) -> float:
        a = shared_array
        t = time.perf_counter()
        for i in range(n):
            a[i & 511]  # noqa: B018 - the read is what we time
        return time.perf_counter() - t

    def retire_case(domain: Any) -> Callable[[int], float]:
        def case(n: int) -> float:
            domain.quiescent()  # the runs between cases are not one long stall
            t = time.perf_counter()
            retire = domain.retire
            for o in OBJS[:n]:
                retire(o, noop_release)
            domain.barrier()
            return time.perf_counter() - t

        return case

    bg = q.Domain(background=True)
    bg.register()

    pool_domain = q.Domain(stall_timeout=None)
    pool_domain.register()
    pool = q.BufferPool(domain=pool_domain)

    def cleanup() -> None:
        for dom in (d, rs, debug_domain, bg, pool_domain):
            dom.unregister()
            dom.close()

    def tagged(cases: dict[str, Callable[[int], float]]) -> dict[str, Callable[[int], float]]:
        return {f"{k}[{tag}]": v for k, v in cases.items()}

    reader = tagged({"quiescent": quiescent, "handle_quiescent": handle_quiescent})
    request = tagged(
        {
            "shared_array_read": shared_array_read,
            "read_section": read_section,
            "handle_read_section": handle_read_section,
            "attach_quiescent_detach": attach_quiescent_detach,
            "detached_section": detached_section,
            "handle_detached_section": handle_detached_section,
            "detach_attach": detach_attach,
            "cell_value": cell_read(plain_cell),
            "cell_value_debug": cell_read(debug_cell),
        }
    )
    writer = tagged(
        {
            "retire_and_release": retire_case(d),
            "retire_background_reclaimer": retire_case(bg),
            **{f"pool_{size}": pool_cycles(pool, pool_domain.quiescent, size) for size in POOL_SIZES},
        }
    )
    return reader, request, writer, {"cleanup": lambda n: (cleanup(), 0.0)[1]}


OBJS = [object() for _ in range(100_000)]
POOL_SIZES = (64, 4096, 65536)


def per_thread_handle_quiescent(q: Any, threads: int, n: int) -> float:
    """ns per handle.quiescent() in each of ``threads`` threads calling it at
    once on one domain (P1s: on 3.13t, what a reader pays when others run).
    With ``q`` None, an empty method call of a thread's own object instead:
    the machine's own slowdown with two busy threads, nothing shared."""
    d = q.Domain() if q is not None else None
    start = threading.Barrier(threads + 1, timeout=60)
    took: list[float] = []

    def body() -> None:
        if d is not None:
            h = d.register()
            quiesce = h.quiescent
        else:
            quiesce = Plain().empty
        start.wait()
        t = time.perf_counter()
        for _ in range(n):
            quiesce()
        took.append(time.perf_counter() - t)
        if d is not None:
            d.unregister()

    workers = [threading.Thread(target=body) for _ in range(threads)]
    for w in workers:
        w.start()
    start.wait()
    for w in workers:
        w.join(120)
    if d is not None:
        d.close()
    return sum(took) / len(took) / n * 1e9


#: Issue 13's targets for the native kernel (ratio <= target).
TARGETS = {
    "P1 quiescent / empty method call": ("quiescent", "empty_call", 1.0),
    "P1h handle.quiescent / empty method call": ("handle_quiescent", "empty_call", 0.8),
    "P3 retire+release / append+call": ("retire_and_release", "append_and_release", 5.0),
    "P8 with domain.attached() / with lock": ("read_section", "lock_acquire_release", 1.0),
    "P7 BufferPool 64 B / bytearray": ("pool_64", "bytearray_64", 2.0),
    "P7 BufferPool 4 KiB / bytearray": ("pool_4096", "bytearray_4096", 1.0),
    "P7 BufferPool 64 KiB / bytearray": ("pool_65536", "bytearray_65536", 0.5),
}


def main() -> None:
    twins = kernels()
    p = Plain()

    def empty_call(n: int) -> float:
        m = p.empty
        del m
        t = time.perf_counter()
        for _ in range(n):
            p.empty()
        return time.perf_counter() - t

    def empty_loop(n: int) -> float:
        t = time.perf_counter()
        for _ in range(n):
            pass
        return time.perf_counter() - t

    floor = FloorDomain()

    def floor_quiescent(n: int) -> float:
        t = time.perf_counter()
        for _ in range(n):
            floor.quiescent()
        return time.perf_counter() - t

    lock = threading.Lock()

    def lock_section(n: int) -> float:
        lk = lock
        t = time.perf_counter()
        for _ in range(n):
            with lk:
                pass
        return time.perf_counter() - t

    locked_list = list(range(1000))

    def list_under_lock_read(n: int) -> float:
        lk, lst = lock, locked_list
        t = time.perf_counter()
        for i in range(n):
            with lk:
                lst[i & 511]  # noqa: B018 - the read is what we time
        return time.perf_counter() - t

    def append_and_release(n: int) -> float:
        lst: list[object] = []
        t = time.perf_counter()
        for o in OBJS[:n]:
            lst.append(o)
            noop_release(o)
        return time.perf_counter() - t

    def floor_case(retire: Callable[[Any, Callable[[Any], Any]], int]) -> Callable[[int], float]:
        def case(n: int) -> float:
            t = time.perf_counter()
            for o in OBJS[:n]:
                retire(o, noop_release)
            floor.flush()
            return time.perf_counter() - t

        return case

    reader_cases: dict[str, Callable[[int], float]] = {
        "loop": empty_loop,
        "empty_call": empty_call,
        "floor_quiescent": floor_quiescent,
    }
    request_cases: dict[str, Callable[[int], float]] = {
        "list_under_lock_read": list_under_lock_read,
        "lock_acquire_release": lock_section,
    }

    writer_cases: dict[str, Callable[[int], float]] = {
        **{f"bytearray_{size}": fresh_bytearrays(size) for size in POOL_SIZES},
        "append_and_release": append_and_release,
        "floor_retire": floor_case(floor.retire),
        "floor_retire_checked": floor_case(floor.retire_checked),
    }
    cleanups = []
    for tag, q in twins.items():
        r, rq, w, c = kernel_cases(q, tag)
        reader_cases.update(r)
        request_cases.update(rq)
        writer_cases.update(w)
        cleanups.append(c["cleanup"])

    n = 200_000 if QUICK else 2_000_000
    m = 20_000 if QUICK else 100_000
    repeats = 3 if QUICK else 9
    reader = interleaved(reader_cases, n, repeats)
    request = interleaved(request_cases, n // 4, repeats)
    writer = interleaved(writer_cases, m, repeats)
    for c in cleanups:
        c(0)

    # P1s: per-thread cost with two threads at once, against one (median of
    # `repeats` alternating runs per kernel).
    scaling: dict[str, dict[str, float]] = {}
    for tag, q in [*twins.items(), ("empty_call", None)]:
        one, two = [], []
        for _ in range(repeats):
            one.append(per_thread_handle_quiescent(q, 1, n // 2))
            two.append(per_thread_handle_quiescent(q, 2, n // 2))
        scaling[tag] = {"one_thread_ns": statistics.median(one), "two_threads_ns": statistics.median(two)}
        scaling[tag]["ratio"] = scaling[tag]["two_threads_ns"] / scaling[tag]["one_thread_ns"]

    every = {**reader, **request, **writer}

    def ratio(case: str, base: str) -> float:
        return every[case]["median_ns"] / every[base]["median_ns"]

    # Ratios from the medians of the interleaved samples; loop overhead is
    # included on both sides of each ratio, as a caller's loop would be.
    per_kernel: dict[str, dict[str, float]] = {}
    for tag in twins:
        k = f"[{tag}]"
        per_kernel[tag] = {
            "quiescent_vs_empty_call": ratio("quiescent" + k, "empty_call"),
            "handle_quiescent_vs_empty_call": ratio("handle_quiescent" + k, "empty_call"),
            "retire_release_vs_append_call": ratio("retire_and_release" + k, "append_and_release"),
            "retire_background_vs_append_call": ratio(
                "retire_background_reclaimer" + k, "append_and_release"
            ),
            "read_section_vs_lock": ratio("read_section" + k, "lock_acquire_release"),
            "handle_read_section_vs_lock": ratio("handle_read_section" + k, "lock_acquire_release"),
            "attach_quiescent_detach_vs_lock": ratio("attach_quiescent_detach" + k, "lock_acquire_release"),
            "detached_section_vs_detach_attach": ratio("detached_section" + k, "detach_attach" + k),
            "handle_detached_section_vs_detach_attach": ratio(
                "handle_detached_section" + k, "detach_attach" + k
            ),
            "debug_cell_read_vs_plain": ratio("cell_value_debug" + k, "cell_value" + k),
            "shared_array_read_vs_locked_list": ratio("shared_array_read" + k, "list_under_lock_read"),
        }
    floor_ratios = {
        "floor_quiescent_vs_empty_call": ratio("floor_quiescent", "empty_call"),
        "floor_retire_vs_append_call": ratio("floor_retire", "append_and_release"),
        "floor_retire_checked_vs_append_call": ratio("floor_retire_checked", "append_and_release"),
    }
    targets = {
        name: {tag: ratio(f"{case}[{tag}]", base) for tag in twins} | {"target": limit}
        for name, (case, base, limit) in TARGETS.items()
    }
    results = {
        "reader": reader,
        "writer": writer,
        "request": request,
        "kernels": list(twins),
        "ratios": per_kernel,
        "floor": floor_ratios,
        "targets": targets,
        "handle_quiescent_two_threads_vs_one": scaling,
        "n": {"reader": n, "writer": m, "repeats": repeats},
    }
    path = write_json("core", results)
    mach = machine()
    print(f"python {mach['python']} ({mach['build']}), {mach['cpus']} cpus, {mach['platform']}")
    for group in (reader, request, writer):
        for name, r in group.items():
            print(f"  {name:<36} median {r['median_ns']:8.1f} ns/op   min {r['min_ns']:8.1f}")
    tags = list(twins)
    print(f"  {'ratio (medians)':<52}" + "".join(f"{t:>9}" for t in tags) + "   target")
    for name, row in targets.items():
        print(f"  {name:<52}" + "".join(f"{row[t]:8.2f}x" for t in tags) + f"   <= {row['target']}x")
    labels = {
        "retire_background_vs_append_call": "retire+release, background reclaimer / append+call",
        "handle_read_section_vs_lock": "with handle.attached() / with lock",
        "attach_quiescent_detach_vs_lock": "attach(); quiescent(); detach() / with lock",
        "detached_section_vs_detach_attach": "with domain.detached() / detach(); attach()",
        "handle_detached_section_vs_detach_attach": "with handle.detached() / detach(); attach()",
        "debug_cell_read_vs_plain": "debug mode: Cell.value / plain",
        "shared_array_read_vs_locked_list": "SharedArray a[i] / list[i] in a lock",
    }
    for key, label in labels.items():
        print(f"  {label:<52}" + "".join(f"{per_kernel[t][key]:8.2f}x" for t in tags))
    print(
        f"  {'P1s handle.quiescent per thread, 2 threads / 1':<52}"
        + "".join(f"{scaling[t]['ratio']:8.2f}x" for t in tags)
        + "   <= 1.3x (3.13t)"
    )
    for t in [*tags, "empty_call"]:
        print(
            f"    {t}: {scaling[t]['one_thread_ns']:.1f} ns alone, "
            f"{scaling[t]['two_threads_ns']:.1f} ns each with two threads "
            f"({scaling[t]['ratio']:.2f}x)"
        )
    print("    (empty_call: an empty method call of each thread's own object, nothing shared)")
    print("  the pure-Python floor (FloorDomain: no goals, no scan, no lock):")
    print(f"    quiescent / empty method call    {floor_ratios['floor_quiescent_vs_empty_call']:5.2f}x")
    print(f"    retire+release / append+call     {floor_ratios['floor_retire_vs_append_call']:5.2f}x")
    print(f"    the same + TypeError check, size {floor_ratios['floor_retire_checked_vs_append_call']:5.2f}x")
    print(f"  wrote {path}")


if __name__ == "__main__":
    if "--check-floor" in sys.argv:
        check_floor()
    else:
        main()
