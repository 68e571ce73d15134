"""A service's core tasks (receive loops, schedulers, heartbeats) run as a group that cannot half-die.

A receive loop survives a message whose handling fails (`surviving`). Anything else that ends a core task ends the
group: the exception is raised to the service's main, which logs it and exits non-zero so a supervisor
restarts the process. A live process that has silently stopped serving is never the outcome.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from contextlib import contextmanager

from .wire.codes import Code
from .wire.transport import Rejects

log = logging.getLogger(__name__)


class TaskEnded(RuntimeError):
    """A core task returned although it should run until cancelled."""


async def first_to_end(stop: asyncio.Event | None, coros: list[Awaitable]) -> asyncio.Future | None:
    """Run the awaitables as tasks until `stop` is set (returns None) or one ends (returns it, re-raising its
    exception). The others are cancelled and awaited either way."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    waited = tasks + ([asyncio.ensure_future(stop.wait())] if stop is not None else [])
    try:
        done, _ = await asyncio.wait(waited, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in waited:
            t.cancel()
        await asyncio.gather(*waited, return_exceptions=True)
    ended = next((t for t in tasks if t in done), None)
    if ended is not None and not ended.cancelled():
        ended.result()
    return ended


@contextmanager
def surviving(rejects: Rejects, what: str):
    """Around one message's handling: a bug it hits is logged with its traceback and counted (`internal`), and
    the receive loop goes on with the next message."""
    try:
        yield
    except Exception as exc:
        log.exception("handling %s failed; serving on", what)
        rejects.add(Code.INTERNAL, f"handling {what} failed: {exc!r}")
