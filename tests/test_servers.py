"""Servers whose request threads are attached only while they handle a
request (servers.py; docs/guide.md, "Servers"): the stdlib http.server and
socketserver, WSGI, and the examples that run them under load."""

from __future__ import annotations

import http.client
import http.server
import socket
import socketserver
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import qsbr
from helpers import STEP_TIMEOUT, Resource, Worker, wait_until

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


class Served:
    """A ThreadingHTTPServer on a free port, in the background."""

    def __init__(self, handler: type[http.server.BaseHTTPRequestHandler]) -> None:
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def connect(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=STEP_TIMEOUT)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(STEP_TIMEOUT)


def make_handler(domain: qsbr.Domain, cell: qsbr.Cell[Resource], base: type) -> type:
    class Handler(base):  # type: ignore[misc, valid-type]
        qsbr_domain = domain
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            if self.path == "/attached":
                body = str(int(domain.is_attached())).encode()
            else:
                body = str(cell.value.use()).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler


def get(conn: http.client.HTTPConnection, path: str) -> str:
    conn.request("GET", path)
    return conn.getresponse().read().decode()


def test_an_idle_keep_alive_connection_holds_nothing_back(domain: qsbr.Domain) -> None:
    old = Resource(1)
    cell = qsbr.Cell(old, Resource.release, domain=domain)
    served = Served(make_handler(domain, cell, qsbr.ReadSectionHTTPRequestHandler))
    try:
        conn = served.connect()
        assert get(conn, "/attached") == "1"  # attached while it handles the request
        assert get(conn, "/value") == "1"
        # The connection stays open and idle; its thread waits for the next
        # request line, detached.
        assert wait_until(lambda: domain.stats().threads == 1 and domain.stats().attached == 0)
        cell.set(Resource(2))
        assert domain.barrier(timeout=STEP_TIMEOUT)  # nothing held back
        assert old.releases == 1
        assert get(conn, "/value") == "2"  # the same connection goes on
        conn.close()
    finally:
        served.close()
    assert wait_until(lambda: domain.stats().threads == 0)  # the handler thread left as it ended


def test_a_handler_attached_for_its_whole_connection_holds_releases_back(domain: qsbr.Domain) -> None:
    """The trap the mixin avoids (../shared/repros/http_server_hot_swap.py,
    "executor-naive"): attached across keep-alive waits, an idle connection
    holds every release back."""

    class Naive(http.server.BaseHTTPRequestHandler):
        def handle(self) -> None:
            with domain.attached():  # the whole connection: the bug
                super().handle()

    old = Resource(1)
    cell = qsbr.Cell(old, Resource.release, domain=domain)
    served = Served(make_handler(domain, cell, Naive))
    try:
        conn = served.connect()
        assert get(conn, "/value") == "1"
        cell.set(Resource(2))
        assert not domain.barrier(timeout=0.3)  # held back by an idle connection
        assert not old.released
        conn.close()
        assert domain.barrier(timeout=STEP_TIMEOUT)  # the connection ended: released
    finally:
        served.close()


def test_a_request_that_raises_still_ends_its_section(domain: qsbr.Domain) -> None:
    class Failing(qsbr.ReadSectionHTTPRequestHandler):
        qsbr_domain = domain
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def log_error(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            raise RuntimeError("handler bug")

    served = Served(Failing)
    served.server.handle_error = lambda request, address: None  # type: ignore[method-assign]
    try:
        with socket.create_connection(("127.0.0.1", served.port), timeout=STEP_TIMEOUT) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            s.recv(100)  # the server drops the connection (the handler raised)
        assert wait_until(lambda: domain.stats().threads == 1 or domain.stats().threads == 0)
        assert wait_until(lambda: domain.stats().attached == 0)
    finally:
        served.close()


def test_a_plain_socketserver_handler_is_one_section(domain: qsbr.Domain) -> None:
    seen: list[bool] = []

    class EchoOnce(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            seen.append(domain.is_attached())
            self.wfile.write(self.rfile.readline())

    class Echo(qsbr.ReadSectionMixin, EchoOnce):
        qsbr_domain = domain

    srv = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Echo)
    srv.daemon_threads = True
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        with socket.create_connection(srv.server_address, timeout=STEP_TIMEOUT) as s:  # type: ignore[arg-type]
            s.sendall(b"hello\n")
            assert s.recv(100) == b"hello\n"
    finally:
        srv.shutdown()
        srv.server_close()
        t.join(STEP_TIMEOUT)
    assert seen == [True]
    assert wait_until(lambda: domain.stats().attached == 0)


# -- WSGI ---------------------------------------------------------------------------


def call_app(app: Callable[..., Any], path: str = "/") -> tuple[list[bytes], Any]:
    statuses: list[str] = []
    result = app({"PATH_INFO": path, "QUERY_STRING": ""}, lambda s, h, e=None: statuses.append(s))
    return result, statuses


def test_wsgi_middleware_spans_the_request_until_close(domain: qsbr.Domain) -> None:
    seen: list[tuple[str, bool]] = []

    def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        seen.append(("call", domain.is_attached()))
        start_response("200 OK", [])

        def body() -> Iterator[bytes]:
            seen.append(("chunk", domain.is_attached()))
            yield b"a"
            seen.append(("chunk", domain.is_attached()))
            yield b"b"

        return body()

    mw = qsbr.ReadSectionMiddleware(app, domain)
    result, _ = call_app(mw)
    assert list(result) == [b"a", b"b"]
    assert domain.is_attached()  # until the server closes the response
    result.close()  # type: ignore[attr-defined]
    assert not domain.is_attached()
    assert seen == [("call", True), ("chunk", True), ("chunk", True)]
    result.close()  # type: ignore[attr-defined]  # twice: nothing more
    domain.unregister()


def test_wsgi_middleware_with_a_list_response_and_with_an_app_that_raises(domain: qsbr.Domain) -> None:
    mw = qsbr.ReadSectionMiddleware(lambda e, s: [b"done"], domain)
    result, _ = call_app(mw)
    assert result == [b"done"] and not domain.is_attached()

    def broken(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        raise KeyError("app bug")

    with pytest.raises(KeyError):
        call_app(qsbr.ReadSectionMiddleware(broken, domain))
    assert not domain.is_attached()
    with pytest.raises(TypeError, match="WSGI application"):
        qsbr.ReadSectionMiddleware(42)  # type: ignore[arg-type]
    domain.unregister()


def test_wsgi_middleware_refuses_a_close_from_another_thread(domain: qsbr.Domain, worker: Worker) -> None:
    mw = qsbr.ReadSectionMiddleware(lambda e, s: iter([b"x"]), domain)
    result, _ = call_app(mw)
    with pytest.raises(RuntimeError, match="another thread"):
        worker.call(result.close)  # type: ignore[attr-defined]
    assert domain.is_attached()  # still open: the section is this thread's
    result.close()  # type: ignore[attr-defined]
    assert not domain.is_attached()
    domain.unregister()


# -- the examples, under load ----------------------------------------------------


def run_example(*args: str) -> str:
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / args[0]), *args[1:]], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "verified" in out.stdout
    return out.stdout


def test_the_http_server_example_runs_under_load() -> None:
    out = run_example("http_server.py", "3", "6")
    assert " 0 uses after close" in out and " 0 not closed exactly once" in out


@pytest.mark.parametrize("server", ["wsgiref", "waitress"])
def test_the_wsgi_example_runs_under_load(server: str) -> None:
    if server == "waitress":
        pytest.importorskip("waitress")
    out = run_example("wsgi_app.py", "3", server)
    assert " 0 uses after close" in out and " 0 not closed exactly once" in out
