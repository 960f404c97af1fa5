"""Child processes for the SharedDomain/SharedCell tests.

A ``Child`` is a fresh interpreter (subprocess: nothing inherited) that runs
the Python statements the test sends it, one line each, and answers each
with its ``out`` variable. Every wait is bounded: a child that does not
answer in STEP_TIMEOUT seconds fails the test, and every child is killed at
the end of its test (``children`` fixture in the test modules).
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
from typing import Any

STEP_TIMEOUT = 20.0

_SERVE = r"""
import os, sys, time, threading, zlib, struct
import qsbr
ns = dict(qsbr=qsbr, os=os, sys=sys, time=time, threading=threading, zlib=zlib, struct=struct)
print("ready", os.getpid(), flush=True)
for line in sys.stdin:
    try:
        exec(line, ns)
        print("ok", repr(ns.pop("out", None)), flush=True)
    except SystemExit:
        raise
    except BaseException as exc:
        print("err", type(exc).__name__, str(exc).replace("\n", " "), flush=True)
"""


#: Children may cache bytecode (in the venv, not beside the sources): where
#: PYTHONDONTWRITEBYTECODE is set, every child would compile the standard
#: library it imports again (0.8 s per child on the free-threaded build).
_BYTECODE = {"PYTHONDONTWRITEBYTECODE": "", "PYTHONPYCACHEPREFIX": os.path.join(sys.prefix, "pycache")}


class ChildError(Exception):
    pass


class Child:
    """A child interpreter serving statements (see the module docstring)."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _SERVE],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **_BYTECODE, **(env or {})},
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._stderr: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()
        threading.Thread(target=self._pump_stderr, daemon=True).start()
        first = self._next()
        assert first.startswith("ready"), first
        self.pid = int(first.split()[1])

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def _pump_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._stderr.append(line)

    @property
    def stderr(self) -> str:
        return "".join(self._stderr)

    def _next(self, timeout: float = STEP_TIMEOUT) -> str:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise ChildError(f"child {self.proc.pid} did not answer in {timeout} s") from None
        if line is None:
            raise ChildError(f"child {self.proc.pid} exited ({self.proc.wait(5)}): {self.stderr}")
        return line

    def send(self, statement: str) -> None:
        """Send a statement without waiting for its answer (read it with answer())."""
        assert "\n" not in statement
        assert self.proc.stdin is not None
        self.proc.stdin.write(statement + "\n")
        self.proc.stdin.flush()

    def answer(self, timeout: float = STEP_TIMEOUT) -> Any:
        line = self._next(timeout)
        if line.startswith("err"):
            raise ChildError(line)
        assert line.startswith("ok "), line
        return eval(line[3:])

    def run(self, statement: str, timeout: float = STEP_TIMEOUT) -> Any:
        """Run ``statement`` in the child; its ``out`` variable, or ChildError."""
        self.send(statement)
        return self.answer(timeout)

    def kill(self) -> None:
        """SIGKILL, not reaped (a zombie until wait())."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)

    def wait(self, timeout: float = STEP_TIMEOUT) -> int:
        return self.proc.wait(timeout)

    def close(self) -> None:
        self.kill()
        try:
            self.proc.wait(STEP_TIMEOUT)
        except subprocess.TimeoutExpired:  # pragma: no cover - a SIGKILL is not ignored
            pass
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass


def shm_names(prefix: str) -> list[str]:
    """What /dev/shm holds under ``prefix``."""
    return sorted(n for n in os.listdir("/dev/shm") if n.startswith(prefix))
