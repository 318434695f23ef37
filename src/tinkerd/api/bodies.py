"""Reading request bodies: size limits at the door, and JSON that cannot take the server down.

A body past its route's limit is refused with 413 before the route reads it: at once when
its Content-Length says so, or as soon as the bytes received pass the limit. JSON is parsed
with Python's own parser, which recurses once per nesting level; a body nested deeper than
the interpreter's recursion limit is the client's error, not the server's.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from fastapi import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tinkerd.core.uploads import MAX_UPLOAD_FILE_BYTES
from tinkerd.types import UserError

# The SDK cuts forward_backward calls into chunks of about 5 MB; a single datum past that
# (a long sequence with per-token top-k targets) is sent whole, so its limit is generous.
MAX_PROTOBUF_BODY_BYTES = 64 << 20
PROTOBUF_PATHS = frozenset({"/api/v1/forward_backward"})
# Every other body is JSON: a 128k-token prompt is ~1 MB of it.
MAX_JSON_BODY_BYTES = 8 << 20
# A weights upload PUTs one adapter file: it is streamed to disk by its route, which stops
# it at the upload limit (core/uploads.py), so here only its declared length is checked.
SIGNED_UPLOAD_PATH = "/api/v1/signed_upload"
STREAMED_PATHS = {SIGNED_UPLOAD_PATH: MAX_UPLOAD_FILE_BYTES}


def body_limit(path: str) -> int:
    if path in STREAMED_PATHS:
        return STREAMED_PATHS[path]
    return MAX_PROTOBUF_BODY_BYTES if path in PROTOBUF_PATHS else MAX_JSON_BODY_BYTES


async def json_body(request: Request) -> Any:
    try:
        body = await request.json()
    except RecursionError:
        raise UserError("request body is nested too deeply to be parsed as JSON") from None
    except ValueError:
        raise UserError("request body is not valid JSON") from None
    if has_unpaired_surrogate(body):
        raise UserError(UNPAIRED_SURROGATE)
    return body


UNPAIRED_SURROGATE = "request body has a string with an unpaired surrogate (a lone \\ud800-\\udfff escape), which is not text"


def has_unpaired_surrogate(value: Any) -> bool:
    """Whether a parsed JSON value holds a string no text encoding can store or tokenize.

    JSON's escapes can spell half of a UTF-16 pair ("\\ud800"), and Python's parser keeps it
    as a lone surrogate; the database and the tokenizer refuse it, far from the request.
    """
    try:
        json.dumps(value, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return True
    return False


class BodySizeLimit:
    """ASGI middleware: 413, rendered by `render(status, message, request)` in the shape of the
    door the request came through, for a body past `body_limit(path)`.

    The body is read here, up to the limit, and handed on whole: refusing it from inside the
    route's read would have to cross every middleware in between.
    """

    def __init__(self, app: ASGIApp, render: Callable[[int, str, Request], Response]):
        self.app = app
        self.render = render

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = body_limit(scope["path"])
        too_large = self.render(413, f"request body is larger than this route's limit of {limit} bytes", Request(scope))
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await too_large(scope, receive, send)
            return
        if scope["path"] in STREAMED_PATHS:
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            event = await receive()
            if event["type"] != "http.request":
                return  # the client left before its body was complete
            chunks.append(event.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                await too_large(scope, receive, send)
                return
            if not event.get("more_body", False):
                break
        body: bytes | None = b"".join(chunks)

        async def replay() -> Message:
            nonlocal body
            if body is None:
                return await receive()  # after the body: a disconnect, for streamed responses
            event: Message = {"type": "http.request", "body": body, "more_body": False}
            body = None
            return event

        await self.app(scope, replay, send)
