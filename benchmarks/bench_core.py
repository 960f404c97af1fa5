"""Core costs, measured side by side in one run (docs/benchmarks.md).

1. The readers' only cost: Domain.quiescent() against an empty method call.
   Target: at most 2x. Also ThreadHandle.quiescent(), the per-thread form.
2. retire() plus its eventual release, amortized per object, against
   appending to a list and calling the release directly. Target: at most 5x.
3. The pure-Python floor of both: FloorDomain below does the least that any
   pure-Python domain must do for these two operations, and less than a
   correct one does. Where the floor is over a target, no pure-Python
   implementation meets that target on this interpreter.

Run:  qsbr bench core   (or: make bench; PYTHON=... for another interpreter)
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import qsbr  # noqa: E402
from _common import QUICK, interleaved, machine, write_json  # noqa: E402


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


def main() -> None:
    d = qsbr.Domain()
    d.register()
    p = Plain()

    def empty_call(n: int) -> float:
        m = p.empty
        del m
        t = time.perf_counter()
        for _ in range(n):
            p.empty()
        return time.perf_counter() - t

    def quiescent(n: int) -> float:
        t = time.perf_counter()
        for _ in range(n):
            d.quiescent()
        return time.perf_counter() - t

    def empty_loop(n: int) -> float:
        t = time.perf_counter()
        for _ in range(n):
            pass
        return time.perf_counter() - t

    handle = d.handle()
    floor = FloorDomain()

    def floor_quiescent(n: int) -> float:
        t = time.perf_counter()
        for _ in range(n):
            floor.quiescent()
        return time.perf_counter() - t

    def handle_quiescent(n: int) -> float:
        h = handle
        t = time.perf_counter()
        for _ in range(n):
            h.quiescent()
        return time.perf_counter() - t

    n = 200_000 if QUICK else 2_000_000
    repeats = 3 if QUICK else 9
    reader = interleaved(
        {
            "loop": empty_loop,
            "empty_call": empty_call,
            "quiescent": quiescent,
            "handle_quiescent": handle_quiescent,
            "floor_quiescent": floor_quiescent,
        },
        n,
        repeats,
    )

    # What a server pays per request: a read section on a thread that is
    # detached between requests, beside an uncontended threading.Lock.
    rs = qsbr.Domain()
    rs_handle = rs.register()
    rs.detach()
    lock = threading.Lock()

    def lock_section(n: int) -> float:
        lk = lock
        t = time.perf_counter()
        for _ in range(n):
            with lk:
                pass
        return time.perf_counter() - t

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
    d_handle = d.handle()

    def detached_section(n: int) -> float:
        detached = d.detached
        t = time.perf_counter()
        for _ in range(n):
            with detached():
                pass
        return time.perf_counter() - t

    def handle_detached_section(n: int) -> float:
        detached = d_handle.detached
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
    plain_cell = qsbr.Cell(1, domain=d)
    debug_domain = qsbr.Domain(debug=True)
    debug_domain.register()
    debug_cell = qsbr.Cell(1, domain=debug_domain)

    def cell_read(cell: qsbr.Cell[int]) -> Callable[[int], float]:
        def case(n: int) -> float:
            c = cell
            t = time.perf_counter()
            for _ in range(n):
                c.value  # noqa: B018 - the read is what we time
            return time.perf_counter() - t

        return case

    # A SharedArray read beside a list read under a Lock.
    shared_array = qsbr.SharedArray("q", pool=qsbr.BufferPool(domain=d))
    shared_array.extend(range(1000))
    locked_list = list(range(1000))

    def shared_array_read(n: int) -> float:
        a = shared_array
        t = time.perf_counter()
        for i in range(n):
            a[i & 511]  # noqa: B018 - the read is what we time
        return time.perf_counter() - t

    def list_under_lock_read(n: int) -> float:
        lk, lst = lock, locked_list
        t = time.perf_counter()
        for i in range(n):
            with lk:
                lst[i & 511]  # noqa: B018 - the read is what we time
        return time.perf_counter() - t

    request = interleaved(
        {
            "shared_array_read": shared_array_read,
            "list_under_lock_read": list_under_lock_read,
            "lock_acquire_release": lock_section,
            "read_section": read_section,
            "handle_read_section": handle_read_section,
            "attach_quiescent_detach": attach_quiescent_detach,
            "detached_section": detached_section,
            "handle_detached_section": handle_detached_section,
            "detach_attach": detach_attach,
            "cell_value": cell_read(plain_cell),
            "cell_value_debug": cell_read(debug_cell),
        },
        n // 4,
        repeats,
    )
    rs.unregister()
    rs.close()
    debug_domain.unregister()
    debug_domain.close()

    objs = [object() for _ in range(100_000)]

    def append_and_release(n: int) -> float:
        lst: list[object] = []
        t = time.perf_counter()
        for o in objs[:n]:
            lst.append(o)
            noop_release(o)
        return time.perf_counter() - t

    def retire_case(domain: qsbr.Domain) -> Callable[[int], float]:
        def case(n: int) -> float:
            t = time.perf_counter()
            retire = domain.retire
            for o in objs[:n]:
                retire(o, noop_release)
            domain.barrier()
            return time.perf_counter() - t

        return case

    def floor_case(retire: Callable[[Any, Callable[[Any], Any]], int]) -> Callable[[int], float]:
        def case(n: int) -> float:
            t = time.perf_counter()
            for o in objs[:n]:
                retire(o, noop_release)
            floor.flush()
            return time.perf_counter() - t

        return case

    bg = qsbr.Domain(background=True)
    bg.register()
    retire_and_release = retire_case(d)
    retire_background = retire_case(bg)

    m = 20_000 if QUICK else 100_000
    writer = interleaved(
        {
            "append_and_release": append_and_release,
            "retire_and_release": retire_and_release,
            "retire_background_reclaimer": retire_background,
            "floor_retire": floor_case(floor.retire),
            "floor_retire_checked": floor_case(floor.retire_checked),
        },
        m,
        repeats,
    )
    bg.unregister()
    bg.close()
    d.unregister()
    d.close()

    # Ratios from the medians of the interleaved samples; loop overhead is
    # included on both sides of each ratio, as a caller's loop would be.
    q_ratio = reader["quiescent"]["median_ns"] / reader["empty_call"]["median_ns"]
    h_ratio = reader["handle_quiescent"]["median_ns"] / reader["empty_call"]["median_ns"]
    r_ratio = writer["retire_and_release"]["median_ns"] / writer["append_and_release"]["median_ns"]
    rb_ratio = writer["retire_background_reclaimer"]["median_ns"] / writer["append_and_release"]["median_ns"]
    fq_ratio = reader["floor_quiescent"]["median_ns"] / reader["empty_call"]["median_ns"]
    fr_ratio = writer["floor_retire"]["median_ns"] / writer["append_and_release"]["median_ns"]
    frc_ratio = writer["floor_retire_checked"]["median_ns"] / writer["append_and_release"]["median_ns"]
    lock_ns = request["lock_acquire_release"]["median_ns"]
    section_ratio = request["read_section"]["median_ns"] / lock_ns
    handle_section_ratio = request["handle_read_section"]["median_ns"] / lock_ns
    triplet_ratio = request["attach_quiescent_detach"]["median_ns"] / lock_ns
    detached_ratio = request["detached_section"]["median_ns"] / request["detach_attach"]["median_ns"]
    handle_detached_ratio = (
        request["handle_detached_section"]["median_ns"] / request["detach_attach"]["median_ns"]
    )
    debug_read_ratio = request["cell_value_debug"]["median_ns"] / request["cell_value"]["median_ns"]
    array_ratio = request["shared_array_read"]["median_ns"] / request["list_under_lock_read"]["median_ns"]
    results = {
        "reader": reader,
        "writer": writer,
        "request": request,
        "ratios": {
            "quiescent_vs_empty_call": q_ratio,
            "handle_quiescent_vs_empty_call": h_ratio,
            "retire_release_vs_append_call": r_ratio,
            "retire_background_vs_append_call": rb_ratio,
            "floor_quiescent_vs_empty_call": fq_ratio,
            "floor_retire_vs_append_call": fr_ratio,
            "floor_retire_checked_vs_append_call": frc_ratio,
            "read_section_vs_lock": section_ratio,
            "handle_read_section_vs_lock": handle_section_ratio,
            "attach_quiescent_detach_vs_lock": triplet_ratio,
            "detached_section_vs_detach_attach": detached_ratio,
            "handle_detached_section_vs_detach_attach": handle_detached_ratio,
            "debug_cell_read_vs_plain": debug_read_ratio,
            "shared_array_read_vs_locked_list": array_ratio,
        },
        "targets": {"quiescent_vs_empty_call": 2.0, "retire_release_vs_append_call": 5.0},
        "n": {"reader": n, "writer": m, "repeats": repeats},
    }
    path = write_json("core", results)
    mach = machine()
    print(f"python {mach['python']} ({mach['build']}), {mach['cpus']} cpus, {mach['platform']}")
    for group in (reader, writer, request):
        for name, r in group.items():
            print(f"  {name:<30} median {r['median_ns']:8.1f} ns/op   min {r['min_ns']:8.1f}")
    print(f"  quiescent / empty method call      {q_ratio:5.2f}x   (target <= 2x)")
    print(f"  ThreadHandle.quiescent / empty     {h_ratio:5.2f}x")
    print(f"  retire+release / append+call       {r_ratio:5.2f}x   (target <= 5x)")
    print(f"  same, background reclaimer         {rb_ratio:5.2f}x")
    print("  the pure-Python floor (FloorDomain: no goals, no scan, no lock):")
    print(f"    quiescent / empty method call    {fq_ratio:5.2f}x")
    print(f"    retire+release / append+call     {fr_ratio:5.2f}x")
    print(f"    the same + TypeError check, size {frc_ratio:5.2f}x")
    print("  per request, against `with lock: pass` on an uncontended threading.Lock:")
    print(f"    with domain.attached(): pass     {section_ratio:5.2f}x")
    print(f"    with handle.attached(): pass     {handle_section_ratio:5.2f}x")
    print(f"    attach(); quiescent(); detach()  {triplet_ratio:5.2f}x")
    print(f"  with domain.detached(): pass / detach(); attach()  {detached_ratio:5.2f}x")
    print(f"  with handle.detached(): pass / detach(); attach()  {handle_detached_ratio:5.2f}x")
    print(f"  debug mode: Cell.value / plain     {debug_read_ratio:5.2f}x")
    print(f"  SharedArray a[i] / list[i] in lock {array_ratio:5.2f}x")
    print(f"  wrote {path}")


if __name__ == "__main__":
    if "--check-floor" in sys.argv:
        check_floor()
    else:
        main()
