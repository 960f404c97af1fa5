"""A WSGI app hot-swapping a routing table, with qsbr.ReadSectionMiddleware.

The app answers lookups from a routing table that a writer replaces every
few milliseconds through a qsbr.Cell. A table's close() frees it; qsbr
runs it once no request can hold the table. The app is wrapped in
qsbr.ReadSectionMiddleware: each request is a read section, from the call
of the app until the server closes the response, so the server's worker
threads are attached only while they work on a request, and the response
generator may use the table the app read.

It runs under the standard library's wsgiref (one thread per request) and,
when it is installed, waitress (a pool of worker threads). At the end it
checks that no request touched a closed table and that every replaced
table was closed exactly once.

Run:  python examples/wsgi_app.py [seconds] [server: wsgiref|waitress]
"""

from __future__ import annotations

import http.client
import socketserver
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import qsbr

ROUTES = 512


class RoutingTable:
    """route -> backend; close() frees it (a native table, say)."""

    def __init__(self, version: int) -> None:
        self.version = version
        self.routes: dict[int, str] | None = {r: f"backend-{(r + version) % 17}" for r in range(ROUTES)}
        self.closes = 0

    def lookup(self, route: int) -> str:
        routes = self.routes
        if routes is None:
            raise RuntimeError(f"table v{self.version} used after close()")
        return routes[route % ROUTES]

    def close(self) -> None:
        self.closes += 1
        self.routes = None


def make_app(current: qsbr.Cell[RoutingTable], errors: list[str]) -> Callable[..., Iterable[bytes]]:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        route = int(environ["QUERY_STRING"].rsplit("=", 1)[1])
        table = current.value  # inside the request's read section
        start_response("200 OK", [("Content-Type", "text/plain")])

        def body() -> Iterable[bytes]:
            # Runs while the server iterates the response, still inside the
            # request's read section (it ends at close()): `table` is safe.
            yield f"v{table.version} ".encode()
            try:
                yield table.lookup(route).encode()
            except RuntimeError as exc:
                errors.append(str(exc))
                yield b"ERR"

        return body()

    return app


class ThreadingWSGIServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


class QuietHandler(WSGIRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


def serve(kind: str, app: Callable[..., Iterable[bytes]]) -> tuple[int, Callable[[], None]]:
    """Start a server of ``kind`` in the background; returns (port, stop)."""
    if kind == "wsgiref":
        srv = make_server("127.0.0.1", 0, app, server_class=ThreadingWSGIServer, handler_class=QuietHandler)
        threading.Thread(target=srv.serve_forever, name="wsgiref", daemon=True).start()

        def stop_wsgiref() -> None:
            srv.shutdown()
            srv.server_close()

        return srv.server_address[1], stop_wsgiref
    if kind == "waitress":
        import logging

        from waitress.server import create_server

        # "Task queue depth is 1" is waitress noting a request waited for a
        # free worker: expected with more clients than workers.
        logging.getLogger("waitress.queue").setLevel(logging.ERROR)
        wsrv = create_server(app, host="127.0.0.1", port=0, threads=4)
        threading.Thread(target=wsrv.run, name="waitress", daemon=True).start()
        return wsrv.effective_port, wsrv.close  # type: ignore[union-attr]
    raise SystemExit(f"unknown server {kind!r}: wsgiref or waitress")


def run(seconds: float = 5.0, kind: str = "wsgiref", clients: int = 4) -> dict[str, int]:
    domain = qsbr.Domain()
    tables = [RoutingTable(0)]
    current: qsbr.Cell[RoutingTable] = qsbr.Cell(tables[0], RoutingTable.close, domain=domain)
    errors: list[str] = []
    port, stop_server = serve(kind, qsbr.ReadSectionMiddleware(make_app(current, errors), domain))
    stop = threading.Event()
    counts = {"ok": 0, "bad": 0}
    lock = threading.Lock()

    def client(cid: int) -> None:
        ok = bad = n = 0
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        while not stop.is_set():
            route = (cid * 31 + n) % ROUTES
            conn.request("GET", f"/route?r={route}")
            resp = conn.getresponse()
            version, backend = resp.read().decode().split(" ", 1)
            if resp.getheader("Connection", "").lower() == "close" or resp.will_close:
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            n += 1
            if backend == f"backend-{(route + int(version[1:])) % 17}":
                ok += 1
            else:
                bad += 1
        conn.close()
        with lock:
            counts["ok"] += ok
            counts["bad"] += bad

    def writer() -> None:
        v = 0
        while not stop.is_set():
            v += 1
            t = RoutingTable(v)
            tables.append(t)
            current.set(t)
            time.sleep(0.003)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    threads.append(threading.Thread(target=writer, name="writer"))
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join(30)
    time.sleep(0.2)  # let the server finish the responses it is writing
    stop_server()
    current.close()
    drained = domain.barrier(timeout=30)
    domain.close()
    return {
        "requests": counts["ok"] + counts["bad"],
        "bad_answers": counts["bad"],
        "use_after_close": len(errors),
        "tables": len(tables),
        "not_closed_once": sum(1 for t in tables if t.closes != 1),
        "drained": int(drained),
    }


def main() -> None:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 5.0
    kind = sys.argv[2] if len(sys.argv) > 2 else "wsgiref"
    r = run(seconds, kind)
    print(
        f"{kind}: {r['requests']:,} requests ({r['requests'] / seconds:,.0f}/s), {r['bad_answers']} bad "
        f"answers, {r['use_after_close']} uses after close; {r['tables']} tables, "
        f"{r['not_closed_once']} not closed exactly once"
    )
    ok = not (r["bad_answers"] or r["use_after_close"] or r["not_closed_once"]) and r["drained"]
    print("verified: every table closed exactly once, none while in use" if ok else "FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
