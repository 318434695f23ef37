"""A cap on each user's work in progress.

A user who submits faster than the engine runs (an RL loop firing thousands of sample
calls, a script queueing training steps in a loop) would otherwise grow the queues, and the
memory they hold, without bound. Past `max_queued_per_user` requests in progress (submitted,
not yet finished), a new request is refused for now with HTTP 429 and `Retry-After`: the
SDKs take that as "busy, send it again" (the tinker SDK's holder retries it for up to five
minutes, its sampling client backs off and throttles; the OpenAI SDK retries it too). A
training request refused this way does not use up its `seq_id`: the same request comes back.

What counts: every request of the Tinker door that becomes engine work (training calls,
checkpoint saves and loads, model creation, each sample call whatever its `num_samples`),
from its submission until its result is there; and each prompt of an OpenAI completion from
its submission to the engine until it finishes. Retries of a request already accepted are
not counted again.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future

from tinkerd.core.access import User
from tinkerd.core.futures import FutureStore
from tinkerd.types import UserError

DEFAULT_MAX_QUEUED_PER_USER = 1000


class QueueFull(UserError):
    """The caller has as much work in progress as the server takes from one user (HTTP 429)."""

    status = 429
    retry_after_s = 1


class WorkCap:
    def __init__(self, max_per_user: int, futures: FutureStore):
        self.max_per_user = max_per_user  # 0: no cap
        self._futures = futures
        self._direct: dict[str, int] = {}  # engine futures held outside the future store (the OpenAI door)
        self._lock = threading.Lock()

    def in_progress(self, user: User) -> int:
        return self._futures.pending_of(user.name) + self._direct.get(user.name, 0)

    def admit(self, user: User) -> None:
        """Refuse (QueueFull) a new request of a user at the cap."""
        if self.max_per_user and self.in_progress(user) >= self.max_per_user:
            raise QueueFull(f"{user.name} has {self.in_progress(user)} requests in progress, the most this server takes "
                            f"from one user (--max-queued-per-user {self.max_per_user}); send it again once some finish")

    def hold(self, user: User, future: Future) -> None:
        """Count `future` as the user's work until it is done."""
        with self._lock:
            self._direct[user.name] = self._direct.get(user.name, 0) + 1

        def release(_: Future) -> None:
            with self._lock:
                left = self._direct.get(user.name, 1) - 1
                if left > 0:
                    self._direct[user.name] = left
                else:
                    self._direct.pop(user.name, None)

        future.add_done_callback(release)
