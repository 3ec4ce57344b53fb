"""Time bounds on a client's connection: the request head, the body, and idle keep-alive.

A client that connects and sends nothing, trickles its headers, or stops in the middle of a
body would otherwise hold a connection (and what it sent) for ever: uvicorn bounds only the idle
time between requests (``timeout_keep_alive``). Two more bounds, at the layer each belongs to:

* :class:`HeadTimeoutProtocol`, uvicorn's own HTTP protocol (httptools, else h11) with one timer:
  a request head must be complete within ``head_timeout`` of the connection's start, or of its
  first byte after the previous response; else the connection is closed (nothing was routed).
* :class:`BodyTimeout`, ASGI middleware: while the request body is incomplete, each read waits
  at most ``seconds`` for the next bytes (as nginx's ``client_body_timeout``), else 408
  ``request_timeout`` and the connection is closed. A slow client that keeps sending is not cut.
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.auto import AutoHTTPProtocol

from .errors import RequestTimeoutError


class HeadTimeoutProtocol(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
    """uvicorn's HTTP protocol, closing connections whose request head takes over ``head_timeout``.

    Passed to ``uvicorn.Config(http=functools.partial(HeadTimeoutProtocol, head_timeout=...))``.
    """

    def __init__(self, *args, head_timeout: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._head_timeout = head_timeout
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        before = self.cycle
        if before is None or before.response_complete:  # bytes of a new request (or leftovers)
            self._arm()
        super().data_received(data)
        if self.cycle is not before:  # a request head was parsed
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self._head_timeout, self._expire)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _expire(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            self.transport.close()


class BodyTimeout:
    """Pure ASGI middleware: a request body read that waits over ``seconds`` raises 408."""

    def __init__(self, app, seconds: float) -> None:
        self.app = app
        self.seconds = seconds

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        body_done = False

        async def timed_receive():
            nonlocal body_done
            if body_done:  # later reads wait for a disconnect, for as long as the response takes
                return await receive()
            try:
                async with asyncio.timeout(self.seconds):
                    message = await receive()
            except TimeoutError:
                raise RequestTimeoutError(
                    f"no request body bytes for {self.seconds:g} s: the connection is closed "
                    "(MMSTORE_BODY_TIMEOUT_SECONDS sets this bound)"
                ) from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        await self.app(scope, timed_receive, send)
