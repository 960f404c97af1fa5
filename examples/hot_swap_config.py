"""The README example: readers use a config without a lock; a writer swaps it
and the old one is closed only once no reader can still hold it."""

import threading
import time

import qsbr


class Config:
    def __init__(self, version: int) -> None:
        self.version, self.closed = version, False

    def close(self) -> None:
        self.closed = True


domain = qsbr.Domain()
current = [Config(0)]  # readers load current[0] without a lock
stop = threading.Event()


def reader() -> None:
    with domain.registered():
        while not stop.is_set():
            cfg = current[0]
            assert not cfg.closed  # never fails: close() waits for us
            domain.quiescent()  # between requests: we hold no Config


threads = [threading.Thread(target=reader) for _ in range(4)]
for t in threads:
    t.start()
with domain.registered():
    for v in range(1, 200):
        old, current[0] = current[0], Config(v)  # publish the new version
        domain.retire(old, Config.close)  # close the old one when safe
        with domain.detached():  # blocking: hold nothing, hold nobody back
            time.sleep(0.001)
    stop.set()
    for t in threads:
        t.join()
    domain.barrier()  # every retired Config is closed now
s = domain.stats()
print(f"swaps: 199, closed: {s.releases}, largest backlog: {s.peak_pending}")
