"""A lean ASGI path for the hottest route, blob GET/HEAD.

FastAPI's routing, dependency injection and response classes cost more per request than reading
a 100 KB blob from the page cache (see bench/RESULTS.md). This middleware answers
``GET|HEAD /v1/blobs/{digest}`` before FastAPI sees it, with the same :class:`BlobReader`, the
same auth and the same error bodies as the documented route (which serves when
``fast_blob_path`` is off), and counts it in the same metrics.
"""

from __future__ import annotations

import json
import time
from typing import Any

from .auth import Authorizer
from .blob_read import BlobReader
from .errors import ApiError
from .metrics import StoreMetrics

_PREFIX = "/v1/blobs/"
_ROUTE = "/v1/blobs/{digest}"


class BlobFastPath:
    def __init__(self, app, reader: BlobReader, authorizer: Authorizer, metrics: StoreMetrics) -> None:
        self.app = app
        self.reader = reader
        self.authorizer = authorizer
        self.metrics = metrics
        # labelled children cached: labels() costs more than the increment it guards
        self._latency = metrics.latency.labels(_ROUTE)
        self._requests: dict[tuple[str, int], Any] = {}

    async def __call__(self, scope, receive, send):
        if (
            scope["type"] != "http"
            or scope["method"] not in ("GET", "HEAD")
            or not scope["path"].startswith(_PREFIX)
            or "/" in scope["path"][len(_PREFIX) :]
        ):
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        headers = {}
        for k, v in scope["headers"]:
            if k in (b"authorization", b"range", b"if-none-match"):
                headers[k] = v.decode("latin-1")
        head = scope["method"] == "HEAD"
        stream = None
        try:
            self.authorizer.check(headers.get(b"authorization"), "read")
            reply = await self.reader.read(
                scope["path"][len(_PREFIX) :],
                head=head,
                range_header=headers.get(b"range"),
                if_none_match=headers.get(b"if-none-match"),
            )
            status, out_headers, body, stream = reply.status, reply.headers, reply.body, reply.stream
        except ApiError as exc:
            status, body = exc.status, json.dumps(exc.body()).encode()
            out_headers = {"content-type": "application/json", "content-length": str(len(body))}
            if status == 401:
                out_headers["www-authenticate"] = "Bearer"
            self.metrics.errors.labels(exc.code).inc()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(k.encode(), v.encode()) for k, v in out_headers.items()],
            }
        )
        if stream is not None:  # a remote backend's bytes, as they arrive
            sent = 0
            async for chunk in stream:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                sent += len(chunk)
            await send({"type": "http.response.body", "body": b""})
            self.metrics.bytes_out.inc(sent)
        else:
            await send({"type": "http.response.body", "body": b"" if head else body})
            if not head:
                self.metrics.bytes_out.inc(len(body))
        key = (scope["method"], status)
        counter = self._requests.get(key)
        if counter is None:
            counter = self._requests[key] = self.metrics.requests.labels(_ROUTE, key[0], str(status))
        counter.inc()
        self._latency.observe(time.perf_counter() - started)
