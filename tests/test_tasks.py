"""A service's core tasks: the first to end ends the group, and a failed message leaves its loop running."""
import asyncio
import logging

import pytest

from amusd_mq.tasks import first_to_end, surviving
from amusd_mq.wire.transport import Rejects

pytestmark = pytest.mark.asyncio


async def test_a_failing_task_ends_the_group_with_its_error_and_cancels_the_rest():
    cancelled = asyncio.Event()

    async def forever():
        try:
            await asyncio.sleep(3600)
        finally:
            cancelled.set()

    async def broken():
        await asyncio.sleep(0.01)
        raise KeyError("injected")

    with pytest.raises(KeyError, match="injected"):
        await first_to_end(asyncio.Event(), [forever(), broken()])
    assert cancelled.is_set()


async def test_a_returning_task_is_reported_and_stop_returns_none():
    async def quick():
        return "done"

    ended = await first_to_end(None, [asyncio.sleep(3600), quick()])
    assert ended.result() == "done"
    stop = asyncio.Event()
    asyncio.get_running_loop().call_later(0.01, stop.set)
    assert await first_to_end(stop, [asyncio.sleep(3600)]) is None


async def test_surviving_logs_the_traceback_counts_and_goes_on(caplog):
    rejects = Rejects()
    handled = []
    for i in range(3):
        with surviving(rejects, f"message {i}"):
            if i == 1:
                raise ValueError("bug")
            handled.append(i)
    assert handled == [0, 2] and rejects.counts["internal"] == 1
    record = next(r for r in caplog.records if r.levelno == logging.ERROR)
    assert "message 1" in record.getMessage() and record.exc_info[0] is ValueError
