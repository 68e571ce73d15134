"""What draft and verify workers share: registration, heartbeats, reconnection, message dispatch.

A worker connects a DEALER to the coordinator, registers, and then serves Assign/Release and its role's
messages. Heartbeats flow both ways (Paranoid Pirate): a coordinator silent for `liveness` intervals is
presumed dead, the worker drops its requests and registers again, after a quarter heartbeat and then with
backoff capped at two heartbeats; a successful registration resets the backoff.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine

import zmq
import zmq.asyncio

from . import protocol as p
from .config import Config, ConfigurationError
from .runtime.lm import LM
from .runtime.thread import ModelThread
from .security import load_keys, secure
from .tasks import first_to_end, surviving
from .transport import Rejects, make_socket, recv_valid, send

log = logging.getLogger(__name__)
BACKOFF_CAP_BEATS = 2  # the longest wait between registrations, in heartbeats


class Worker:
    role = ""

    def __init__(self, cfg: Config, lm: LM, thread: ModelThread, ctx: zmq.asyncio.Context | None = None):
        self.cfg = cfg
        self.lm = lm
        self.thread = thread
        self.ctx = ctx or zmq.asyncio.Context.instance()
        self.rejects = Rejects()
        self.keys = load_keys(self.role, cfg.curve_secret_key, cfg.curve_server_key)
        self.dealer: zmq.asyncio.Socket | None = None
        self.requests: dict = {}
        self.tasks: dict[str, asyncio.Task] = {}
        self.last_heard = 0.0
        self.registered_seq: int | None = None  # the PUB sequence number at registration; None until registered
        self.forgotten = asyncio.Event()  # the coordinator answered with unknown_worker
        self.handlers = {p.Assign: self.on_assign, p.Release: self.on_release, p.Heartbeat: self._noop,
                         p.Error: self.on_error}

    def register_message(self) -> p.Register:
        return p.Register(role=self.role, model=self.lm.name, runner=self.lm.runner, vocab_size=self.lm.vocab_size,
                          vocab_hash=self.lm.info.vocab_hash, max_context=self.lm.max_context,
                          eos_token_ids=self.lm.eos_token_ids)

    async def run(self, stop: asyncio.Event) -> None:
        """Serve registration after registration until stopped. Raises ConfigurationError when refused, and any
        unexpected error of a core task, so the process exits non-zero rather than live on without serving."""
        register = self.register_message()
        backoff = self._first_backoff
        while not stop.is_set():
            if self.thread.busy:  # still inside a pass of a request it was dropped from: maybe hung
                log.warning("waiting for the model thread to finish its forward pass before registering")
                while self.thread.busy and not stop.is_set():
                    await asyncio.sleep(self.cfg.heartbeat_s)
                continue
            self.registered_seq = None
            try:
                if await first_to_end(stop, [self._session(register)]) is None:
                    break
            except ConnectionError as exc:
                log.warning("%s", exc)
            finally:
                self._drop_all()
            if self.registered_seq is not None:  # it served: a new coordinator is probably up already
                backoff = self._first_backoff
            log.warning("lost the coordinator; registering again in %.2fs", backoff)
            try:
                await asyncio.wait_for(stop.wait(), backoff)
            except asyncio.TimeoutError:
                pass
            backoff = min(backoff * 2, BACKOFF_CAP_BEATS * self.cfg.heartbeat_s)

    @property
    def _first_backoff(self) -> float:
        return self.cfg.heartbeat_s / 4

    async def _session(self, register: p.Register) -> None:
        """One registration: returns when the coordinator is presumed dead (silent, or it forgot this worker)."""
        self.dealer = make_socket(self.ctx, zmq.DEALER, self.cfg.max_message_bytes)
        secure(self.dealer, self.keys)
        self.dealer.connect(self.cfg.coordinator_url)
        self.forgotten.clear()
        try:
            await send(self.dealer, register)
            self.last_heard = time.monotonic()
            await self._wait_registered()
            log.info("%s worker registered with %s (%s, %s runner)", self.role, self.cfg.coordinator_url, self.lm.name,
                     self.lm.runner)
            await self.on_registered()
            # Only the heartbeat returns; the receive loops end by raising, which ends the process.
            await first_to_end(None, [self._recv_loop(), self._heartbeat(), *self.extra_tasks()])
        finally:
            self.dealer.close()
            self.on_disconnected()

    async def _wait_registered(self) -> None:
        while True:
            try:
                msg = await asyncio.wait_for(self._recv(self.dealer), self.cfg.heartbeat_expiry_s)
            except asyncio.TimeoutError:
                raise ConnectionError("no answer to registration") from None
            if isinstance(msg, p.Registered):
                self.registered_seq = msg.seq
                return
            if isinstance(msg, p.Error):
                raise ConfigurationError(f"coordinator refused this {self.role} worker ({msg.code}): {msg.message}")

    async def _recv_loop(self) -> None:
        while True:
            msg = await self._recv(self.dealer)
            self.last_heard = time.monotonic()
            handler = self.handlers.get(type(msg))
            if handler is None:
                self.rejects.add("unexpected_type", f"{msg.TYPE} is not accepted by a {self.role} worker")
                continue
            with surviving(self.rejects, msg.TYPE):
                await handler(msg)

    async def _recv(self, sock: zmq.asyncio.Socket) -> p.Message:
        return await recv_valid(sock, self.cfg.max_message_bytes, self.rejects)

    async def _heartbeat(self) -> None:
        """Beats until the coordinator is presumed dead, silent for the liveness window or having forgotten this
        worker, and then returns."""
        while time.monotonic() - self.last_heard <= self.cfg.heartbeat_expiry_s:
            try:
                await asyncio.wait_for(self.forgotten.wait(), self.cfg.heartbeat_s)
                return
            except asyncio.TimeoutError:
                await send(self.dealer, p.Heartbeat(busy=self.thread.busy, passes=self.thread.done))

    async def _noop(self, msg: p.Message) -> None:
        pass

    async def on_error(self, msg: p.Error) -> None:
        if msg.code == "unknown_worker":  # the coordinator restarted and forgot us
            log.warning("the coordinator does not know this worker")
            self.forgotten.set()
            return
        log.warning("coordinator reported %s: %s", msg.code, msg.message)

    async def on_assign(self, msg: p.Assign) -> None:
        held = self.requests.get(msg.req_id)
        if held is not None:
            if msg.epoch <= held.assigned:
                return  # a duplicate
            held.release()  # resent under a newer epoch: what it holds was built on a lost message
        if any(t >= self.lm.vocab_size for t in msg.prompt_ids + msg.committed):
            self.rejects.add("invalid_assign", "assignment with token ids outside the vocabulary")
            return
        self.requests[msg.req_id] = state = self.new_request(msg)
        self.tasks[msg.req_id] = asyncio.create_task(self._serve_request(state))

    async def _serve_request(self, state) -> None:
        try:
            await self.serve(state)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s request %s failed", self.role, state.rid)
        finally:
            if self.requests.get(state.rid) is state:  # not already replaced by a fresh Assign
                del self.requests[state.rid]
            if self.tasks.get(state.rid) is asyncio.current_task():
                del self.tasks[state.rid]

    async def on_release(self, msg: p.Release) -> None:
        state = self.requests.pop(msg.req_id, None)
        if state is not None:
            state.release()

    def _drop_all(self) -> None:
        for task in self.tasks.values():
            task.cancel()
        self.requests.clear()
        self.tasks.clear()

    # role hooks

    async def on_registered(self) -> None:
        pass

    def on_disconnected(self) -> None:
        pass

    def extra_tasks(self) -> list[Coroutine]:
        return []

    def new_request(self, msg: p.Assign):
        raise NotImplementedError

    async def serve(self, state) -> None:
        raise NotImplementedError
