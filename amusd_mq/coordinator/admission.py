"""Which request runs next, and whether a new one may wait at all. Pure bookkeeping, no I/O.

Bounds: at most `max_queued` requests wait in all, and one client has at most `per_client` in flight
(waiting, being tokenized or running). Order: round-robin between clients, first come first served within
one, so a client that floods the queue delays its own requests, not everyone else's. A request whose
verifier was lost goes first, ahead of every client: it already holds a client's committed tokens.
"""
from __future__ import annotations

from collections import Counter, OrderedDict, deque

from ..wire.codes import Code


class Refused(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class Admission:
    def __init__(self, max_queued: int, per_client: int):
        self.max_queued = max_queued
        self.per_client = per_client
        self.in_flight: Counter[bytes] = Counter()
        self.waiting = 0  # admitted and not running: being tokenized, queued, or resuming
        self._queues: OrderedDict[bytes, deque[str]] = OrderedDict()  # a client's turn comes in this order
        self._resuming: deque[str] = deque()
        self._running: set[str] = set()

    def admit(self, client: bytes) -> None:
        """Count a new request of `client` as waiting, or raise Refused."""
        if self.in_flight[client] >= self.per_client:
            raise Refused(Code.TOO_MANY_REQUESTS, f"this client already has {self.per_client} requests in flight "
                                               f"(AMUSD_MAX_CLIENT_REQUESTS); wait for one to finish")
        if self.waiting >= self.max_queued:
            raise Refused(Code.QUEUE_FULL, f"{self.max_queued} requests are already waiting (AMUSD_MAX_QUEUE); "
                                        f"try again later")
        self.in_flight[client] += 1
        self.waiting += 1

    def enqueue(self, client: bytes, rid: str) -> None:
        """An admitted request is ready to run."""
        self._queues.setdefault(client, deque()).append(rid)

    def resume(self, rid: str) -> None:
        """A running request lost its verifier: it runs again before anything new."""
        self._running.discard(rid)
        self._resuming.append(rid)
        self.waiting += 1

    def next(self) -> str | None:
        """The request to run now, if any waits."""
        if self._resuming:
            rid = self._resuming.popleft()
        elif self._queues:
            client, queue = next(iter(self._queues.items()))
            rid = queue.popleft()
            if queue:
                self._queues.move_to_end(client)
            else:
                del self._queues[client]
        else:
            return None
        self._running.add(rid)
        self.waiting -= 1
        return rid

    def release(self, client: bytes, rid: str) -> None:
        """A request ended, wherever it was."""
        if rid in self._running:
            self._running.remove(rid)
        else:
            self.waiting -= 1
            if rid in self._resuming:
                self._resuming.remove(rid)
            queue = self._queues.get(client)
            if queue is not None and rid in queue:
                queue.remove(rid)
                if not queue:
                    del self._queues[client]
        self.in_flight[client] -= 1
        if self.in_flight[client] <= 0:
            del self.in_flight[client]
