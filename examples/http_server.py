"""A thread-per-connection HTTP server hot-swapping an mmap'd table, with qsbr.

The server is the standard library's ThreadingHTTPServer. Each handler
looks keys up in a table that lives in an mmap'd file; a writer thread
builds a new table every few milliseconds and publishes it through a
qsbr.Cell. The old table's close() unmaps it and deletes its file, which
must not happen while a handler is in the middle of a lookup.

The handler is a qsbr.ReadSectionHTTPRequestHandler: each request is a read
section (the thread is attached from the parsed request to the written
response), and the thread is detached while it waits for the next request
on its keep-alive connection. One client opens a keep-alive connection,
sends one request and then idles, as browsers do: it holds nothing back.

At the end the example checks that no handler touched a closed table, that
every replaced table was closed exactly once, and that no file is left.

Run:  python examples/http_server.py [seconds] [clients]
"""

from __future__ import annotations

import http.client
import http.server
import mmap
import os
import shutil
import struct
import sys
import tempfile
import threading
import time

import qsbr

N_KEYS = 1 << 14  # 64 KiB per table


class Table:
    """A lookup table in an mmap'd file; close() unmaps it and deletes the file."""

    def __init__(self, folder: str, version: int) -> None:
        self.version = version
        self.path = os.path.join(folder, f"table-{version}.bin")
        with open(self.path, "wb") as f:
            f.write(struct.pack(f"<{N_KEYS}I", *(((k * 7 + version) & 0xFFFFFFFF) for k in range(N_KEYS))))
        with open(self.path, "rb") as f:
            self.mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.closes = 0

    def lookup(self, key: int) -> int:
        # Slicing copies and exports no buffer (see docs/guide.md on 3.13t).
        # After close() this raises ValueError: the bug qsbr prevents.
        i = 4 * (key % N_KEYS)
        return int.from_bytes(self.mm[i : i + 4], "little")

    def close(self) -> None:
        self.closes += 1
        self.mm.close()
        os.unlink(self.path)


def run(seconds: float = 5.0, clients: int = 6) -> dict[str, int]:
    folder = tempfile.mkdtemp(prefix="qsbr-http-")
    domain = qsbr.Domain(background=True)  # unmapping is slow: off the request path
    tables = [Table(folder, 0)]
    current: qsbr.Cell[Table] = qsbr.Cell(tables[0], Table.close, domain=domain, size=lambda t: len(t.mm))
    errors: list[str] = []

    class Handler(qsbr.ReadSectionHTTPRequestHandler):
        qsbr_domain = domain
        protocol_version = "HTTP/1.1"  # keep-alive: one thread serves many requests
        disable_nagle_algorithm = True

        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:  # inside the request's read section
            key = int(self.path.rsplit("=", 1)[1])
            table = current.value
            try:
                body = f"{table.version} {table.lookup(key)}".encode()
            except ValueError:
                errors.append(f"table v{table.version} used after close()")
                body = b"ERR"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    port = server.server_address[1]
    threading.Thread(target=server.serve_forever, name="server", daemon=True).start()
    stop = threading.Event()
    counts = {"ok": 0, "bad": 0}
    lock = threading.Lock()

    def client(cid: int) -> None:
        conn: http.client.HTTPConnection | None = None
        n = ok = bad = 0
        while not stop.is_set():
            if conn is None or n % 50 == 0:  # reconnect now and then: threads come and go
                if conn is not None:
                    conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            key = (cid * 7919 + n) % N_KEYS
            conn.request("GET", f"/lookup?k={key}")
            version, value = map(int, conn.getresponse().read().split())
            n += 1
            if value == (key * 7 + version) & 0xFFFFFFFF:
                ok += 1
            else:
                bad += 1
        if conn is not None:
            conn.close()
        with lock:
            counts["ok"] += ok
            counts["bad"] += bad

    def writer() -> None:
        v = 0
        while not stop.is_set():
            v += 1
            t = Table(folder, v)
            tables.append(t)
            current.set(t)  # the old table is closed once no request can hold it
            time.sleep(0.005)

    idle = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    idle.request("GET", "/lookup?k=1")  # one request, then an idle keep-alive connection
    idle.getresponse().read()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    threads.append(threading.Thread(target=writer, name="writer"))
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join(30)
    peak = domain.stats().peak_pending
    idle.close()
    server.shutdown()
    server.server_close()
    current.close()
    drained = domain.barrier(timeout=30)
    domain.close()
    wrong = [t.version for t in tables if t.closes != 1]
    left = os.listdir(folder)
    shutil.rmtree(folder, ignore_errors=True)
    return {
        "requests": counts["ok"] + counts["bad"],
        "bad_answers": counts["bad"],
        "use_after_close": len(errors),
        "tables": len(tables),
        "not_closed_once": len(wrong),
        "files_left": len(left),
        "peak_backlog": peak,
        "drained": int(drained),
    }


def main() -> None:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 5.0
    clients = int(sys.argv[2]) if len(sys.argv) > 2 else 6
    r = run(seconds, clients)
    print(
        f"{r['requests']:,} requests ({r['requests'] / seconds:,.0f}/s), {r['bad_answers']} bad answers, "
        f"{r['use_after_close']} uses after close; {r['tables']} tables, {r['not_closed_once']} not closed "
        f"exactly once, {r['files_left']} files left; largest backlog {r['peak_backlog']} tables"
    )
    ok = not (r["bad_answers"] or r["use_after_close"] or r["not_closed_once"] or r["files_left"])
    print("verified: every table closed exactly once, none while in use" if ok else "FAILED")
    sys.exit(0 if ok and r["drained"] else 1)


if __name__ == "__main__":
    main()
