"""`Gate`: the ASGI middleware in front of every route (API key, body limit, request id, log, metrics)."""

from __future__ import annotations

import hmac
import logging
import time

from starlette.exceptions import HTTPException

from .metrics import Metrics
from .protocol import error_response, new_id

log = logging.getLogger("cepe.serving")


class Gate:
    """Pure ASGI middleware in front of every route: API key, body size limit, request id,
    one JSON log line and one metrics sample per request."""

    def __init__(self, app, api_key: str | None, max_body: int, metrics: Metrics):
        self.app, self.api_key, self.max_body, self.metrics = app, api_key, max_body, metrics

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        given = headers.get(b"authorization", b"")
        return hmac.compare_digest(given, b"Bearer " + self.api_key.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status, rid = time.perf_counter(), [500], new_id("req")
        headers = dict(scope["headers"])

        async def send_logged(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())]}
            await send(message)

        received = [0]

        async def receive_limited():
            message = await receive()
            if message["type"] == "http.request":
                received[0] += len(message.get("body", b""))
                if received[0] > self.max_body:
                    raise HTTPException(413, f"request body exceeds {self.max_body} bytes (--max-body-mb)")
            return message

        try:
            if self.api_key and not self._authorized(headers):
                return await error_response(401, "missing or wrong API key (Authorization: Bearer ...)",
                                            "authentication_error", "invalid_api_key")(scope, receive, send_logged)
            length = headers.get(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > self.max_body):
                too_big = length.isdigit()
                return await error_response(
                    413 if too_big else 400,
                    f"request body exceeds {self.max_body} bytes (--max-body-mb)"
                    if too_big
                    else "invalid Content-Length",
                )(scope, receive, send_logged)
            await self.app(scope, receive_limited, send_logged)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            seconds = time.perf_counter() - start
            self.metrics.observe_request(route, status[0], seconds)
            log.info("request", extra={"fields": {
                "event": "request", "request_id": rid, "method": scope["method"], "path": scope["path"][:200],
                "route": route, "status": status[0], "ms": round(1000 * seconds, 1)}})
