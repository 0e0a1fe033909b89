"""Request body size limit for uploads, enforced while the body streams in."""

from __future__ import annotations

import contextlib
import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

MULTIPART_OVERHEAD = 64 * 1024


class BodyTooLarge(Exception):
    pass


class UploadSizeLimit:
    """413 as soon as an upload's body exceeds the limit: by Content-Length before reading,
    or by counting the bytes of a chunked body."""

    def __init__(self, app: ASGIApp, max_bytes: int, path_prefix: str = "/v1/files"):
        self.app, self.path_prefix = app, path_prefix
        self.limit = max_bytes + MULTIPART_OVERHEAD

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(self.path_prefix):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers", []))
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            await _reject(send, self.limit)
            return
        received, state = 0, {"started": False, "rejected": False}

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                # Answer now: the framework may turn the exception below into a 400.
                if not state["started"]:
                    state["started"] = state["rejected"] = True
                    await _reject(send, self.limit)
                raise BodyTooLarge
            return message

        async def tracking_send(message: Message) -> None:
            if state["rejected"]:
                return
            if message["type"] == "http.response.start":
                state["started"] = True
            await send(message)

        with contextlib.suppress(BodyTooLarge):
            await self.app(scope, counting_receive, tracking_send)


async def _reject(send: Send, limit: int) -> None:
    body = json.dumps(
        {
            "error": {
                "code": "payload_too_large",
                "message": f"request body exceeds {limit} bytes",
                "details": None,
            }
        }
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
