"""Shared by the benchmarks: machine description, interleaved timing, JSON output."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

QUICK = os.environ.get("QSBR_BENCH_QUICK") == "1"
#: Where results go: benchmarks/results, or $QSBR_BENCH_OUT (qsbr bench --out).
RESULTS = Path(os.environ.get("QSBR_BENCH_OUT") or Path(__file__).resolve().parent / "results")


def kernels() -> dict[str, Any]:
    """The qsbr package on each kernel available here, for one process to
    time both side by side: {"native": qsbr, "python": a second copy of the
    package loaded as ``qsbr_pure`` with QSBR_PURE_PYTHON=1}. "native" is
    missing when the C kernel is not built (or QSBR_PURE_PYTHON is set)."""
    import importlib.util

    import qsbr

    out: dict[str, Any] = {}
    if qsbr.implementation == "native":
        out["native"] = qsbr
    else:
        out["python"] = qsbr
        return out
    pure = sys.modules.get("qsbr_pure")
    if pure is None:
        init = Path(qsbr.__file__)
        spec = importlib.util.spec_from_file_location(
            "qsbr_pure", init, submodule_search_locations=[str(init.parent)]
        )
        assert spec is not None and spec.loader is not None
        pure = importlib.util.module_from_spec(spec)
        sys.modules["qsbr_pure"] = pure
        saved = os.environ.get("QSBR_PURE_PYTHON")
        os.environ["QSBR_PURE_PYTHON"] = "1"
        try:
            spec.loader.exec_module(pure)
        finally:
            if saved is None:
                del os.environ["QSBR_PURE_PYTHON"]
            else:
                os.environ["QSBR_PURE_PYTHON"] = saved
    assert pure.implementation == "python"
    out["python"] = pure
    return out


def build_tag() -> str:
    ft = bool(sysconfig.get_config_var("Py_GIL_DISABLED"))
    gil = getattr(sys, "_is_gil_enabled", lambda: True)()
    return f"{sys.implementation.cache_tag}{'t' if ft else ''}{'' if gil else '-nogil'}"


def machine() -> dict[str, Any]:
    return {
        "python": sys.version.split()[0],
        "build": "free-threaded, GIL disabled"
        if not getattr(sys, "_is_gil_enabled", lambda: True)()
        else "GIL",
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
    }


def interleaved(
    cases: dict[str, Callable[[int], float]], n: int, repeats: int
) -> dict[str, dict[str, float]]:
    """Run each case `repeats` times, alternating between cases so that noise
    from the shared machine hits all of them alike. Each call returns the
    seconds for n operations; we report ns per operation (min and median)."""
    samples: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            samples[name].append(fn(n) / n * 1e9)
    return {
        k: {"min_ns": min(v), "median_ns": statistics.median(v), "samples": len(v)}
        for k, v in samples.items()
    }


def pool_cycles(pool: Any, quiescent: Callable[[], Any], size: int) -> Callable[[int], float]:
    """P7's loop: n times acquire ``size`` bytes from ``pool``, write a byte,
    release; ``quiescent()`` every 64th (so blocks come back after grace
    periods, as a pipeline's would). Returns the case: n -> seconds."""

    def case(n: int) -> float:
        acquire, release = pool.acquire, pool.release
        t = time.perf_counter()
        for i in range(n):
            v = acquire(size)
            v[0] = 1
            release(v)
            if i & 63 == 63:
                quiescent()
        return time.perf_counter() - t

    return case


def fresh_bytearrays(size: int) -> Callable[[int], float]:
    """P7's baseline: n times ``bytearray(size)`` and a one-byte write."""

    def case(n: int) -> float:
        t = time.perf_counter()
        for _ in range(n):
            b = bytearray(size)
            b[0] = 1
        return time.perf_counter() - t

    return case


def write_json(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}-{build_tag()}.json"
    payload = {"machine": machine(), "command": " ".join(sys.argv), "time": time.time(), **payload}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path
