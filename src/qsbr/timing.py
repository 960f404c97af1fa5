"""Grace-period times: when each advance of wr_seq happened.

Every advance of ``wr_seq`` is recorded with its time until ``rd_seq``
covers it. That answers two questions:

* how long a thread whose ``seq`` is s has gone without a quiescent state:
  since wr_seq first moved past s (``advanced_past(s)``, for stall reports);
* how long each grace period took: from an advance until rd_seq reached it
  (``longest``, and the age of the one in progress, for stats()).

The records live in two flat arrays, not in a list of (wr_seq, time)
tuples. While one thread holds every grace period up, advance() and polls
that fail run thousands of times; each tuple they left alive would count
towards the garbage collector's next collection, and on free-threaded 3.13
a collection walks the whole heap (with 10,000 threads, the poll that
triggers it takes milliseconds). Arrays hold plain numbers: no object a
collector tracks is made on the advance path.

The records are the kernel's (kernel.py): the C twin keeps them in C
arrays and makes each together with its advance, under one lock, so
advance() runs no Python code; the pure twin (_pykernel.py) keeps the same
two sequences in ``array``s under a threading.Lock.

Invariant: the seqs are sorted (wr_seq only grows, and advances are
recorded under the domain's advance lock, in order), and holds only values
rd_seq has not reached when ``covered`` last ran.
"""

from __future__ import annotations

from .kernel import GraceTiming

__all__ = ["GraceTiming"]
