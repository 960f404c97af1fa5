"""The SIGKILL stress test of SharedCell/SharedDomain (issue 14).

One writer process publishes checksummed values of 64 B, 4 KiB and 70 KB
(larger than the 64 KiB arena: a segment of its own each) as fast as the
arena lets it; two reader processes read and check every value, quiescent
after each. Each round SIGKILLs one of the three at a random moment (the
writer in the middle of a publish as often as not) and starts a replacement.
Every round checks that no reader ever saw a torn value and that
reclamation resumed (the writer publishes again, a grace period completes);
at the end, once every process has closed and the cell is unlinked, /dev/shm
holds nothing of ours. QSBR_SHARED_ROUNDS sets the number of rounds (100).
"""

from __future__ import annotations

import os
import random
import time

import pytest
from processes import Child, shm_names

import qsbr

pytestmark = pytest.mark.skipif(qsbr.implementation != "native", reason="SharedCell needs the native kernel")

ROUNDS = int(os.environ.get("QSBR_SHARED_ROUNDS", "100"))

_LOOPS = r"""
stop = threading.Event()
st = {"reads": 0, "bad": 0, "published": 0, "sizes": set()}
def reader():
    h = c.domain.register()
    while not stop.is_set():
        v = c.read()
        if len(v) >= 12:
            _, crc = struct.unpack_from("<QI", v)
            if zlib.crc32(v[12:]) != crc:
                st["bad"] += 1
            st["sizes"].add(len(v) - 12)
        del v
        st["reads"] += 1
        h.quiescent()
        if st["reads"] % 100 == 0:
            time.sleep(0.001)  # leave the 2-core CI machine to the others now and then
    h.detach()
def writer():
    i = 0
    while not stop.is_set():
        body = os.urandom((64, 4096, 70000)[i % 3])
        c.publish(struct.pack("<QI", i, zlib.crc32(body)) + body)
        st["published"] += 1
        i += 1
        time.sleep(0.001)
"""


def _start(name: str, role: str) -> Child:
    child = Child()
    child.run(f"c = qsbr.SharedCell({name!r})")
    child.run(f"exec({_LOOPS!r})")
    child.run(f"t = threading.Thread(target={role}, daemon=True); t.start()")
    return child


def _stats(child: Child) -> dict[str, object]:
    stats: dict[str, object] = child.run("out = dict(st)")
    return stats


def _wait_published(writer: Child, beyond: int, timeout: float = 20.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        published = int(_stats(writer)["published"])  # type: ignore[call-overload]
        if published > beyond:
            return published
        assert time.monotonic() < deadline, f"the writer is stuck at {published} publishes"
        time.sleep(0.01)


@pytest.mark.timeout(600)
def test_sigkill_stress() -> None:
    rng = random.Random(int(os.environ.get("QSBR_SHARED_SEED", "14")))
    cell = qsbr.SharedCell(create=True, capacity=1 << 16)
    name = cell.name
    procs: dict[str, Child] = {}
    kills = {"writer": 0, "reader": 0}
    try:
        procs["writer"] = _start(name, "writer")
        procs["reader0"] = _start(name, "reader")
        procs["reader1"] = _start(name, "reader")
        published = _wait_published(procs["writer"], 0)
        for _round in range(ROUNDS):
            victim = rng.choice(["writer", "reader0", "reader1"])
            time.sleep(rng.uniform(0.0, 0.03))
            procs[victim].kill()
            procs[victim].wait()
            procs[victim].close()
            kills["writer" if victim == "writer" else "reader"] += 1
            procs[victim] = _start(name, "writer" if victim == "writer" else "reader")
            # Whole values only, in every reader alive; every loop still running.
            for role in ("reader0", "reader1", "writer"):
                stats, running = procs[role].run("out = (dict(st), t.is_alive())")
                assert running, f"round {_round}: the {role}'s loop died: {procs[role].stderr}"
                assert stats["bad"] == 0, f"round {_round}: a torn value"
            # Reclamation resumed: the (new) writer publishes again, and a
            # grace period completes (dead readers' slots evicted).
            published = _wait_published(procs["writer"], 0 if victim == "writer" else published)
            assert cell.domain.synchronize(timeout=20), f"round {_round}: no grace period"
        for role in ("reader0", "reader1"):  # a reader started in the last round reads too
            deadline = time.monotonic() + 20
            while not _stats(procs[role])["reads"]:
                assert time.monotonic() < deadline, f"{role} never read: {procs[role].stderr}"
                time.sleep(0.01)
        # Nothing raised anywhere (an eviction's WARNING may be there: fine).
        assert not any("Traceback" in child.stderr for child in procs.values()), [
            c.stderr for c in procs.values()
        ]
        for child in procs.values():
            child.run("stop.set(); t.join(10); c.close()", timeout=60)
    finally:
        for child in procs.values():
            child.close()
        cell.close()
        cell.unlink()
    s = cell.stats()
    assert s["publishes"] > ROUNDS and cell.domain.stats().evicted >= kills["reader"] > 0
    assert not shm_names(name), f"left in /dev/shm: {shm_names(name)}"
