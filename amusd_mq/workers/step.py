"""What draft and verify workers share: registration, heartbeats, reconnection, message dispatch, and the
step loop that serves all their requests at once.

A worker connects a DEALER to the coordinator, registers, and then serves Assign/Release and its role's
messages. Heartbeats flow both ways (Paranoid Pirate): a coordinator silent for `liveness` intervals is
presumed dead, the worker drops its requests and registers again, after a quarter heartbeat and then with
backoff capped at two heartbeats; a successful registration resets the backoff.

The step loop is a scheduler's (SGLang's shape): take the requests that have work, build one batch, run it
in one forward pass on the model thread, process the results, again. New requests' first passes (their
prefills) run together in a pass of their own, taking turns with the others' steps, so new prompts hold the
others up for one pass at a time.

A pass that raises is run again in halves, down to single requests, so that the request that breaks it is found:
that one is dropped and reported (`failed`), and the others go on. A worker whose passes fail for request after
request, with none going through between them, reports itself unhealthy in its heartbeats and is given no work,
until a pass of its own (a probe of no request's) goes through again.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from dataclasses import dataclass, replace

import zmq
import zmq.asyncio

from ..config import Config, ConfigurationError
from ..runtime.lm import LM, Feed, Session
from ..runtime.thread import ModelThread
from ..tasks import first_to_end, surviving
from ..wire import protocol as p
from ..wire.codes import Code
from ..wire.security import load_keys, secure
from ..wire.transport import Rejects, make_socket, recv_valid, send

log = logging.getLogger(__name__)
BACKOFF_CAP_BEATS = 2  # the longest wait between registrations, in heartbeats
PREFILL_BUDGET = 2048  # tokens, padding included, of a pass that prefills several new requests at once
UNHEALTHY_AFTER = 3  # requests failed in a row, no pass going through between them, that make a worker unhealthy
PROBE = list(range(1, 17))  # what an unhealthy worker's probe computes: a short sequence any vocabulary holds


@dataclass(kw_only=True)
class Served:
    """What a worker holds for each request it serves; each role's state adds to it."""
    rid: str
    prompt: list[int]
    session: Session | None = None  # its KV cache, given back on release
    assigned: int = 0  # the epoch of the Assign that started it; a resend comes with a newer one
    done: bool = False

    def release(self) -> None:
        self.done = True
        if self.session is not None:
            self.session.close()


@dataclass(frozen=True)
class Plan:
    """One pass, as build() makes it on the event loop: what compute() runs on the model thread and finish() then
    applies, so that nothing of a pass waits on the worker between its phases. Each role's plan adds to it."""
    steps: list  # one per request, each with its `request`
    prefill: bool  # new requests' first passes

    def halves(self) -> tuple[Plan, Plan]:
        half = len(self.steps) // 2
        return replace(self, steps=self.steps[:half]), replace(self, steps=self.steps[half:])


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
        self.work = asyncio.Event()  # set whenever a request may have something new to do
        self.last_prefill = False  # whether the last pass built was a prefill: only take_turns reads it
        self.last_heard = 0.0
        self.registered_seq: int | None = None  # the PUB sequence number at registration; None until registered
        self.forgotten = asyncio.Event()  # the coordinator answered with unknown_worker
        self.failures = 0  # requests whose passes failed since a pass last went through
        # The coordinator's, from its `registered`: both sides then judge each other by the same clock.
        self.heartbeat_s, self.liveness = cfg.heartbeat_s, cfg.liveness
        self.handlers = {p.Assign: self.on_assign, p.Release: self.on_release, p.Heartbeat: self._noop,
                         p.Error: self.on_error}

    def register_message(self) -> p.Register:
        return p.Register(role=self.role, model=self.lm.name, runner=self.lm.runner, kernels=self.lm.kernels,
                          vocab_size=self.lm.vocab_size,
                          vocab_hash=self.lm.info.vocab_hash, max_context=self.lm.max_context,
                          eos_token_ids=self.lm.eos_token_ids, max_batch=self.cfg.max_batch)

    async def run(self, stop: asyncio.Event) -> None:
        """Serve registration after registration until stopped. Raises ConfigurationError when refused, and any
        unexpected error of a core task, so the process exits non-zero rather than live on without serving."""
        await self.prepare()
        register = self.register_message()
        backoff = self._first_backoff
        while not stop.is_set():
            if self.thread.busy:  # still inside a pass of a request it was dropped from: maybe hung
                log.warning("waiting for the model thread to finish its forward pass before registering")
                while self.thread.busy and not stop.is_set():
                    await asyncio.sleep(self.heartbeat_s)
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
            backoff = min(backoff * 2, BACKOFF_CAP_BEATS * self.heartbeat_s)

    @property
    def _first_backoff(self) -> float:
        return self.heartbeat_s / 4

    @property
    def expiry_s(self) -> float:
        """Silence after which the coordinator is presumed dead."""
        return self.heartbeat_s * self.liveness

    async def _session(self, register: p.Register) -> None:
        """One registration: returns when the coordinator is presumed dead (silent, or it forgot this worker)."""
        self.dealer = make_socket(self.ctx, zmq.DEALER, self.cfg.max_message_bytes)
        secure(self.dealer, self.keys)
        self.dealer.connect(self.cfg.coordinator_url)
        self.forgotten.clear()
        try:
            await send(self.dealer, register)
            self.last_heard = time.monotonic()
            after = await self._wait_registered()
            log.info("%s worker registered with %s (%s, %s runner)", self.role, self.cfg.coordinator_url, self.lm.name,
                     self.lm.runner)
            await self.on_registered()
            await self.dispatch(after, self.handlers, f"a {self.role} worker")
            # Only the heartbeat returns; the receive loops end by raising, which ends the process.
            await first_to_end(None, [self._recv_loop(), self._heartbeat(), self._step_loop(), *self.extra_tasks()])
        finally:
            self.dealer.close()
            self.on_disconnected()

    async def _wait_registered(self) -> list[p.Message]:
        """Until the coordinator accepts this worker; returns what came after `registered` in its frame (an
        `assign`, when requests were waiting)."""
        while True:
            try:
                msgs = await asyncio.wait_for(self._recv(self.dealer), self.expiry_s)
            except asyncio.TimeoutError:
                raise ConnectionError("no answer to registration") from None
            for i, msg in enumerate(msgs):
                if isinstance(msg, p.Registered):
                    self.registered_seq = msg.seq
                    self.heartbeat_s, self.liveness = msg.heartbeat_s, msg.liveness
                    return msgs[i + 1:]
                if isinstance(msg, p.Error):
                    raise ConfigurationError(f"coordinator refused this {self.role} worker ({msg.code}): "
                                             f"{msg.message}")

    async def _recv_loop(self) -> None:
        while True:
            msgs = await self._recv(self.dealer)
            self.last_heard = time.monotonic()
            await self.dispatch(msgs, self.handlers, f"a {self.role} worker")

    async def dispatch(self, msgs: list[p.Message], handlers: dict, receiver: str) -> None:
        """Each message to its handler; one that fails is counted and logged, and the next goes on."""
        for msg in msgs:
            handler = handlers.get(type(msg))
            if handler is None:
                self.rejects.add(Code.UNEXPECTED_TYPE, f"{msg.TYPE} is not accepted by {receiver}")
                continue
            with surviving(self.rejects, msg.TYPE):
                await handler(msg)

    async def _recv(self, sock: zmq.asyncio.Socket) -> list[p.Message]:
        return await recv_valid(sock, self.cfg.max_message_bytes, self.rejects)

    async def _heartbeat(self) -> None:
        """Beats until the coordinator is presumed dead, silent for the liveness window or having forgotten this
        worker, and then returns."""
        while time.monotonic() - self.last_heard <= self.expiry_s:
            try:
                await asyncio.wait_for(self.forgotten.wait(), self.heartbeat_s)
                return
            except asyncio.TimeoutError:
                await self._beat()

    async def _beat(self) -> None:
        await send(self.dealer, p.Heartbeat(busy=self.thread.busy, passes=self.thread.passes, healthy=self.healthy))

    @property
    def healthy(self) -> bool:
        return self.failures < UNHEALTHY_AFTER

    async def _noop(self, msg: p.Message) -> None:
        pass

    async def on_error(self, msg: p.Error) -> None:
        if msg.code == Code.UNKNOWN_WORKER:  # the coordinator restarted and forgot us
            log.warning("the coordinator does not know this worker")
            self.forgotten.set()
            return
        log.warning("coordinator reported %s: %s", msg.code, msg.message)

    async def on_assign(self, msg: p.Assign) -> None:
        held = self.requests.get(msg.req_id)
        if held is not None:
            if msg.epoch <= held.assigned:
                return  # a duplicate
            self._drop(msg.req_id)  # resent under a newer epoch: what it holds was built on a lost message
        if any(t >= self.lm.vocab_size for t in msg.prompt_ids + msg.committed):
            self.rejects.add(Code.INVALID_ASSIGN, "assignment with token ids outside the vocabulary")
            return
        if len(self.requests) >= self.cfg.max_batch:  # the coordinator assigns no more; only a bug gets here
            self.rejects.add(Code.OVER_CAPACITY, f"assignment beyond AMUSD_MAX_BATCH={self.cfg.max_batch}")
            return
        self.requests[msg.req_id] = self.new_request(msg, self.lm.session())
        self.work.set()

    async def on_release(self, msg: p.Release) -> None:
        self._drop(msg.req_id)

    def _drop(self, rid: str) -> None:
        state = self.requests.pop(rid, None)
        if state is not None:
            state.release()

    def _drop_all(self) -> None:
        for rid in list(self.requests):
            self._drop(rid)

    async def _step_loop(self) -> None:
        while True:
            self.work.clear()
            if not self.healthy:
                await self._probe()
                continue
            plan = self.build()
            if plan is None:
                try:
                    await asyncio.wait_for(self.work.wait(), self.patience())
                except asyncio.TimeoutError:
                    pass
                continue
            await self._pass(plan)

    async def _pass(self, plan: Plan) -> None:
        """One forward pass and its outcome; one that raises, again in halves until the request that breaks it is
        found. Each request's KV cache is rolled back to where it was before a failed pass."""
        lengths = [step.request.session.length for step in plan.steps]
        try:
            outcome = await self.thread.submit(self.compute, plan)
        except Exception as exc:
            for step, length in zip(plan.steps, lengths):
                step.request.session.rollback(length)
            self.rejects.add(Code.PASS_FAILED, f"a {self.role} pass over {len(plan.steps)} requests failed: {exc!r}")
            if len(plan.steps) == 1:
                await self._broken(plan.steps[0].request, exc)
            else:
                for half in plan.halves():
                    await self._pass(half)
            return
        self.failures = 0
        await self.finish(plan, outcome)

    async def _broken(self, state: Served, exc: Exception) -> None:
        """A request whose pass fails with it alone: dropped and reported, so that it ends instead of being sent
        again and again; the other requests go on."""
        if state.done:
            return  # released while its batch was being split
        log.error("a %s pass fails with request %s in it: dropping it", self.role, state.rid, exc_info=exc)
        self._drop(state.rid)
        self.failures += 1
        await send(self.dealer, p.Failed(req_id=state.rid, message=f"the {self.role} worker's forward pass failed "
                                                                   f"with this request in it: {exc!r}"))
        if not self.healthy:
            log.error("%d requests in a row failed their %s passes: reporting this worker unhealthy until a probe "
                      "pass goes through", self.failures, self.role)
            self._drop_all()  # the coordinator hands them on
            await self._beat()

    async def _probe(self) -> None:
        """An unhealthy worker's pass of no request's, every liveness window: one that goes through makes it
        healthy again."""
        await asyncio.sleep(self.expiry_s)
        try:
            await self.thread.submit(self._probe_pass)
        except Exception as exc:
            log.warning("the %s worker's probe pass failed (%r): still unhealthy", self.role, exc)
            return
        log.info("a probe pass went through: the %s worker is healthy again", self.role)
        self.failures = 0
        await self._beat()

    def _probe_pass(self) -> None:
        self.inject_failure([PROBE])
        with self.lm.session() as session:
            self.lm.greedy([Feed(session, PROBE, 1)])

    def inject_failure(self, sequences: list[list[int]]) -> None:
        """Fault injection (AMUSD_FAIL_TOKEN), on the model thread: a pass that holds the token raises."""
        token = self.cfg.fail_token
        if token >= 0 and any(token in seq for seq in sequences):
            raise RuntimeError(f"fault injection: a pass holding token {token} (AMUSD_FAIL_TOKEN)")

    def take_turns(self, live: list) -> tuple[list, bool]:
        """The requests of the next pass, and whether it is a prefill: new ones' first passes (together while the
        padded batch stays within PREFILL_BUDGET tokens), or every other's next step; the two take turns."""
        fresh = [r for r in live if r.session.length == 0]
        warm = [r for r in live if r.session.length > 0]
        self.last_prefill = prefill = bool(fresh) and (not warm or not self.last_prefill)
        if not prefill:
            return warm, False
        fresh.sort(key=lambda r: len(r.prompt))  # similar lengths pad least
        batch = fresh[:1]
        for r in fresh[1:]:
            if (len(batch) + 1) * len(r.prompt) > PREFILL_BUDGET:
                break
            batch.append(r)
        return batch, True

    # role hooks

    async def prepare(self) -> None:
        """Once, before the first registration."""

    async def on_registered(self) -> None:
        pass

    def on_disconnected(self) -> None:
        pass

    def extra_tasks(self) -> list[Coroutine]:
        return []

    def new_request(self, msg: p.Assign, session: Session):
        raise NotImplementedError

    def build(self) -> Plan | None:
        """The next pass, taken from the requests on the event loop; None when no request has work."""
        raise NotImplementedError

    def compute(self, plan: Plan):
        """The pass itself, on the model thread."""
        raise NotImplementedError

    async def finish(self, plan: Plan, outcome) -> None:
        """Back on the event loop: apply the pass's outcome and send what it produced."""
        raise NotImplementedError

    def patience(self) -> float | None:
        """How long the loop may wait for news when no request has work (None: until some arrives)."""
        return None
