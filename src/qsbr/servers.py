"""Servers: request threads that are attached only while they handle a request.

The stdlib servers run a thread per connection (``ThreadingHTTPServer``,
``socketserver.ThreadingMixIn``), and WSGI servers a pool of worker threads.
Such a thread reads shared values while it handles a request, and then
blocks: waiting for the next request on a keep-alive connection, or for the
next connection. Attached while it blocks, it would hold every release back
(a browser's idle keep-alive connection held 720 tables back in 12 s in a
user's trial). So each request is one read section (section.py): the
thread is attached from the moment the request is read until its response
is written, and detached while it waits.

* ``ReadSectionMixin``: mix into a ``socketserver`` request handler, before
  the base class. For an ``http.server.BaseHTTPRequestHandler`` each request
  is a section: it begins once the request line and headers are parsed and
  ends when the response has been written (a ``do_GET`` that raises ends it
  too); between requests the thread is detached. For any other handler the
  whole ``handle()`` is one section: a handler that waits for more input
  between its own requests must detach around that wait (``with
  domain.detached():``).
* ``ReadSectionHTTPRequestHandler``: ``BaseHTTPRequestHandler`` with the
  mixin, to subclass as usual (``do_GET`` and so on).
* ``ReadSectionMiddleware(app)``: a WSGI middleware. Each request is a
  section, from the call of the app until the server calls the response's
  ``close()`` (PEP 3333 has every server call it, after the last chunk or
  an error), so a response generator may use what the app read when it was
  called. A response that is a list or tuple ends the section at once.
  The server's waiting for the next request is outside, detached. The
  section is ended on the thread that began it: a server that called
  ``close()`` from another thread gets a RuntimeError saying so.

``qsbr_domain`` (a class attribute, or the middleware's ``domain``) picks the
domain; None means ``qsbr.default_domain()``.
"""

from __future__ import annotations

import http.server
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from .default import domain_or_default
from .domain import Domain
from .section import ReadSection

__all__ = ["ReadSectionMixin", "ReadSectionHTTPRequestHandler", "ReadSectionMiddleware"]


class ReadSectionMixin:
    """A socketserver request handler whose requests are read sections
    (see the module docstring). Put it first: ``class Handler(
    ReadSectionMixin, BaseHTTPRequestHandler)``."""

    #: The domain (None: qsbr.default_domain()).
    qsbr_domain: Domain | None = None
    _qsbr_open: ReadSection | None = None

    def qsbr_section(self) -> ReadSection:
        """This handler thread's read section, to enter by hand."""
        return domain_or_default(self.qsbr_domain).attached()

    def handle(self) -> None:
        if isinstance(self, http.server.BaseHTTPRequestHandler):
            super().handle()  # type: ignore[misc]  # each request: see handle_one_request
            return
        with self.qsbr_section():
            super().handle()  # type: ignore[misc]

    # -- http.server: one section per request ----------------------------

    def parse_request(self) -> bool:
        ok: bool = super().parse_request()  # type: ignore[misc]
        if ok:  # request line and headers read: the request begins
            section = self.qsbr_section()
            section.__enter__()
            self._qsbr_open = section
        return ok

    def handle_one_request(self) -> None:
        try:
            super().handle_one_request()  # type: ignore[misc]
        finally:
            section, self._qsbr_open = self._qsbr_open, None
            if section is not None:  # the response is written: the request ends
                section.__exit__(None, None, None)


class ReadSectionHTTPRequestHandler(ReadSectionMixin, http.server.BaseHTTPRequestHandler):
    """``http.server.BaseHTTPRequestHandler`` whose requests are read sections."""


StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


class ReadSectionMiddleware:
    """``ReadSectionMiddleware(app, domain=None)``: a WSGI app whose every
    request is a read section (see the module docstring)."""

    def __init__(self, app: WSGIApp, domain: Domain | None = None) -> None:
        if not callable(app):
            raise TypeError(f"app must be a WSGI application (a callable), not {type(app).__name__}")
        self.app = app
        self.domain = domain_or_default(domain)

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        section = self.domain.attached()
        section.__enter__()
        try:
            result = self.app(environ, start_response)
        except BaseException:
            section.__exit__(None, None, None)
            raise
        if isinstance(result, (list, tuple)):
            section.__exit__(None, None, None)  # produced already: the request's reads are over
            return result
        return _SectionResponse(result, section)


class _SectionResponse:
    """The app's response; its close() ends the request's read section."""

    __slots__ = ("_result", "_section", "_ident")

    def __init__(self, result: Iterable[bytes], section: ReadSection) -> None:
        self._result = result
        self._section: ReadSection | None = section
        self._ident = threading.get_ident()

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._result)

    def close(self) -> None:
        if self._section is None:
            return  # closed already
        if threading.get_ident() != self._ident:
            raise RuntimeError(
                "the WSGI server called close() on another thread than the one that called the "
                "app; ReadSectionMiddleware ends each request's read section on its own thread. "
                "Use a server that handles a request on one thread (wsgiref, waitress, cheroot, "
                "gunicorn's threads), or enter `with domain.attached():` in the app yourself."
            )
        section, self._section = self._section, None
        try:
            close = getattr(self._result, "close", None)
            if close is not None:
                close()
        finally:
            section.__exit__(None, None, None)
