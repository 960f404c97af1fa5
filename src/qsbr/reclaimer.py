"""The optional background reclaimer: ``Domain(background=True)``.

A daemon thread that polls every ``reclaim_interval`` seconds while work is
pending, and at once when a writer advances wr_seq (``wake()``), so that
writers never run releases themselves: useful when a release is slow
(closing a file, unmapping memory). It scans whole passes (it is on nobody's
hot path) and runs the stall checks.

It holds the domain's reclamation part weakly: a dropped domain ends it.
"""

from __future__ import annotations

import threading
import weakref

from .reclaim import Reclamation

__all__ = ["ReclaimerThread"]


class ReclaimerThread:
    """The thread that polls for one domain."""

    def __init__(self, reclaim: Reclamation, interval: float) -> None:
        self._reclaim_ref = weakref.ref(reclaim)
        self._interval = interval
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="qsbr-reclaimer", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5.0)

    def _run(self) -> None:
        while not self._stopping:
            self._wake.wait(self._interval)
            self._wake.clear()
            reclaim = self._reclaim_ref()
            if reclaim is None:
                return
            try:
                if reclaim.work.count():
                    reclaim.poll(None, None, reclaim.read_wr_seq(), full=True)
                    reclaim.stalls.maybe_check()
            except ReferenceError:  # the domain went away during the poll
                return
            del reclaim  # do not keep the domain's parts alive while sleeping
