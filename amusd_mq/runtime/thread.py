"""The one thread a worker's model runs on, off the event loop."""
from __future__ import annotations

import asyncio
import queue
import threading

import torch


class ModelThread:
    """All model work runs on this one daemon thread: the event loop keeps serving sockets and heartbeats
    during a forward pass, and a shutdown never waits for one to finish."""

    def __init__(self, threads: int = 0):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = threads
        self.passes = 0  # jobs finished, and whether one is running: heartbeats report both, so the
        self.busy = False  # coordinator can tell a hung forward pass from a slow or idle worker
        threading.Thread(target=self._run, name="model", daemon=True).start()

    def _run(self):
        if self._threads:
            torch.set_num_threads(self._threads)
        while True:
            loop, future, fn, args = self._jobs.get()
            self.busy = True
            try:
                outcome = (fn(*args), None)
            except BaseException as exc:  # delivered to the awaiting coroutine
                outcome = (None, exc)
            self.busy = False
            self.passes += 1
            try:
                loop.call_soon_threadsafe(_settle, future, *outcome)
            except RuntimeError:  # the loop closed while this ran: nobody is waiting for the result
                pass

    def submit(self, fn, *args) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._jobs.put((loop, future, fn, args))
        return future


def _settle(future: asyncio.Future, result, exc):
    if future.cancelled():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)

