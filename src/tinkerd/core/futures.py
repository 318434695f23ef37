"""Futures: request id → result, with long polling.

Results are produced on the engine thread and handed to the event loop; a
`retrieve_future` call waits on an asyncio.Event for up to its hold time.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Failure:
    message: str
    category: str  # "user" | "server"


@dataclass
class FutureEntry:
    request_id: str
    kind: str  # what the result is: "fwdbwd", "sample", "optim", "json", ...
    session_id: str | None
    event: asyncio.Event = field(default_factory=asyncio.Event)
    result: Any = None
    failure: Failure | None = None
    created: float = field(default_factory=time.monotonic)
    wire_cache: Any = None  # the API layer may cache the encoded result here


class FutureStore:
    def __init__(self) -> None:
        self._entries: dict[str, FutureEntry] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def create(self, kind: str, session_id: str | None) -> FutureEntry:
        entry = FutureEntry(request_id=f"req-{uuid.uuid4().hex}", kind=kind, session_id=session_id)
        self._entries[entry.request_id] = entry
        return entry

    def get(self, request_id: str) -> FutureEntry | None:
        return self._entries.get(request_id)

    def resolve(self, entry: FutureEntry, result: Any = None, failure: Failure | None = None) -> None:
        """Thread-safe: may be called from the engine thread."""

        def _set() -> None:
            entry.result = result
            entry.failure = failure
            entry.event.set()

        if self._loop is None:
            _set()
        else:
            self._loop.call_soon_threadsafe(_set)

    async def wait(self, entry: FutureEntry, timeout: float) -> bool:
        try:
            await asyncio.wait_for(entry.event.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    def drop_session(self, session_id: str) -> None:
        for rid in [r for r, e in self._entries.items() if e.session_id == session_id and e.event.is_set()]:
            del self._entries[rid]

    def fail_all_pending(self, message: str) -> None:
        for entry in self._entries.values():
            if not entry.event.is_set():
                self.resolve(entry, failure=Failure(message, "server"))
