"""Hot-swap a model served by a thread pool, with qsbr.

A "model" holds weights and has a close() that frees them (think of a GPU
model, an mmap'd index, a native handle). Requests run on a
qsbr.ThreadPoolExecutor: each task reads the current model from a
qsbr.Cell, with no lock. A reloader swaps in a new model every few
milliseconds; the old one is closed only after every task that might be
using it has finished. At the end we check that no request ever ran on a
closed model and that every replaced model was closed exactly once.

Run:  python examples/hot_swap_model.py
"""

from __future__ import annotations

import threading
import time

import qsbr


class Model:
    def __init__(self, version: int) -> None:
        self.version = version
        self.weights: list[float] | None = [float(version)] * 1000
        self.closes = 0

    def predict(self, x: int) -> float:
        w = self.weights
        if w is None:
            raise RuntimeError(f"model v{self.version} used after close()")
        return w[x % 1000] * x

    def close(self) -> None:
        self.closes += 1
        self.weights = None


def main() -> None:
    domain = qsbr.Domain(background=True)  # releases run off the request path
    models = [Model(0)]
    current: qsbr.Cell[Model] = qsbr.Cell(models[0], Model.close, domain=domain)
    stop = threading.Event()

    def handle(x: int) -> float:
        model = current.value  # no lock; valid until this task ends
        total = 0.0
        for i in range(200):
            total += model.predict(x + i)
        return total / model.version if model.version else total

    def reloader() -> None:
        v = 0
        while not stop.is_set():
            v += 1
            m = Model(v)
            models.append(m)
            current.set(m)  # the old model is closed once no task can hold it
            time.sleep(0.002)

    t = threading.Thread(target=reloader)
    t.start()
    errors = 0
    with qsbr.ThreadPoolExecutor(4, domain=domain) as pool:
        futures = [pool.submit(handle, x) for x in range(20_000)]
        for f in futures:
            try:
                f.result()
            except RuntimeError:
                errors += 1
    stop.set()
    t.join()
    domain.barrier(timeout=30)
    replaced = models[:-1]
    bad = sum(1 for m in replaced if m.closes != 1)
    print(f"requests: {len(futures):,}, models swapped: {len(replaced):,}")
    print(f"requests that saw a closed model: {errors}")
    print(f"replaced models not closed exactly once: {bad}")
    domain.close()
    if errors or bad:
        raise SystemExit(1)
    print("ok: every request ran on an open model; every old model was closed once")


if __name__ == "__main__":
    main()
