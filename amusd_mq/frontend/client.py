"""The async Python client. One DEALER socket, any number of concurrent requests over it.

Both sides watch each other. While requests are in flight the client pings every heartbeat the coordinator
names in its `welcome`; a client silent for the coordinator's liveness window has its requests cancelled.
`timeout_s` without a word from the coordinator raises instead of hanging (Lazy Pirate, without blind
resends: a greedy request can simply be submitted again). `close()`, and a stream abandoned before its end,
cancel their requests. Every error a caller sees is an AmusdError.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import AsyncIterator

import zmq
import zmq.asyncio

from .. import validate
from ..config import CLIENT, load
from ..wire import protocol as p
from ..wire.codes import Code, Policy
from ..wire.security import load_keys, secure
from ..wire.transport import make_socket, recv, send

log = logging.getLogger(__name__)


class AmusdError(Exception):
    """Base of every error the client raises."""
    CODES: tuple[Code, ...] = ()  # the refusals' codes that raise it


class CoordinatorUnavailableError(AmusdError, ConnectionError):
    """Nothing answered at the coordinator address, or it went silent."""
    CODES = (Code.COORDINATOR_RESTARTED,)


class NoWorkerError(AmusdError):
    """The coordinator has no verify worker to serve the request."""
    CODES = (Code.NO_WORKER,)


class InvalidRequestError(AmusdError, ValueError):
    """The request was refused as invalid; nothing was generated."""
    CODES = (Code.INVALID_REQUEST, Code.FIELD)


class RequestTimeoutError(AmusdError, TimeoutError):
    """The request's deadline passed before it finished."""


class OverloadedError(AmusdError):
    """Refused for load: the coordinator's queue is full, or this client has as many requests in flight as it
    may. Nothing was generated; try again later."""
    CODES = (Code.QUEUE_FULL, Code.TOO_MANY_REQUESTS)


class RequestTooLargeError(InvalidRequestError):
    """The request doesn't fit one frame of the coordinator's (AMUSD_MAX_MESSAGE_BYTES): it was not sent."""
    CODES = (Code.OVERSIZED,)


class ClientClosedError(AmusdError):
    """The client's connection is gone: close() was called, or reading from it failed."""


class RequestFailedError(AmusdError):
    """The request failed mid-way. `token_ids` holds what had been committed, all of it correct."""

    def __init__(self, message: str, code: str, token_ids: list[int]):
        super().__init__(message)
        self.code = code
        self.token_ids = token_ids


# What a refusal's code raises; any other code, or one with committed tokens, raises RequestFailedError.
ERRORS = {code: error for error in (CoordinatorUnavailableError, NoWorkerError, InvalidRequestError, OverloadedError,
                                    RequestTooLargeError) for code in error.CODES}
READY_POLL_S = 0.1
CANCEL_LINGER_MS = 200  # how long close() gives its cancels to leave when the coordinator is slow to take them


@dataclass
class Chunk:
    token_ids: list[int]
    text: str


@dataclass
class GenerationResult:
    token_ids: list[int]
    text: str
    finish_reason: str
    prompt_ids: list[int]
    stats: dict[str, float] = field(default_factory=dict)


class AsyncClient:
    def __init__(self, url: str | None = None, *, timeout_s: float | None = None,
                 max_message_bytes: int | None = None, curve_secret_key: str | None = None,
                 curve_server_key: str | None = None):
        """Settings not given come from the AMUSD_* environment; the CURVE ones are key file paths ("" for off)."""
        cfg = load()
        self.url = url or cfg.coordinator_url
        self.timeout_s = timeout_s if timeout_s is not None else cfg.timeout_s
        self.max_bytes = max_message_bytes or cfg.max_message_bytes
        self.keys = load_keys(CLIENT, cfg.curve_secret_key if curve_secret_key is None else curve_secret_key,
                              cfg.curve_server_key if curve_server_key is None else curve_server_key)
        self._ctx = zmq.asyncio.Context()
        self._sock: zmq.asyncio.Socket | None = None
        self._streams: dict[str, asyncio.Queue] = {}  # generations, by req_id
        self._calls: dict[str, asyncio.Future] = {}  # hello and status, by req_id
        self.unattributed: Counter[str] = Counter()  # refusals of frames the coordinator couldn't name, by code
        self._tasks: list[asyncio.Task] = []
        self._last_heard = 0.0
        self._closed: ClientClosedError | None = None  # why no request can be sent any more
        self._gone = asyncio.Event()  # set with _closed
        self.welcome: p.Welcome | None = None

    async def __aenter__(self) -> "AsyncClient":
        await self.connect()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def connect(self) -> None:
        self._sock = make_socket(self._ctx, zmq.DEALER, self.max_bytes)
        secure(self._sock, self.keys)
        try:
            self._sock.connect(self.url)
        except zmq.ZMQError as exc:
            await self.close()
            raise CoordinatorUnavailableError(f"can't connect to {self.url!r}: {exc}") from None
        self._tasks.append(asyncio.create_task(self._read()))
        try:
            self.welcome = await self._ask(p.Hello, p.Welcome)
        except BaseException:
            await self.close()  # a context left with an open socket would hang the process at exit
            raise
        self._tasks.append(asyncio.create_task(self._heartbeat()))

    async def close(self) -> None:
        """Cancel every request in flight, so its workers serve others at once, and close the connection."""
        if self._closed is not None and self._ctx.closed:
            return
        in_flight = list(self._streams)
        self._fail_all(ClientClosedError("the client was closed"))
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for req_id in in_flight:
            await self._cancel(req_id)
        if self._sock is not None:
            self._sock.close(linger=CANCEL_LINGER_MS if in_flight else 0)
        self._ctx.term()

    async def _cancel(self, req_id: str) -> None:
        """Tell the coordinator to drop a request, as long as the socket is open: the workers are freed at once.
        Otherwise the coordinator drops the requests of a client gone silent, within its liveness window."""
        if self._sock is not None and not self._sock.closed:
            try:
                await send(self._sock, p.Cancel(req_id=req_id))
            except zmq.ZMQError:
                pass

    def _fail_all(self, error: ClientClosedError) -> None:
        """No request can be sent or answered any more: every waiter raises `error` now."""
        self._closed = self._closed or error
        self._gone.set()
        for queue in self._streams.values():
            queue.put_nowait(error)
        for call in self._calls.values():
            if not call.done():
                call.set_exception(error)

    async def status(self) -> p.StatusReply:
        return await self._ask(p.Status, p.StatusReply)

    async def wait_ready(self, timeout_s: float | None = None) -> p.StatusReply:
        """Until a verify worker is registered with the coordinator, or NoWorkerError after timeout_s (default: the
        client's timeout). Not needed before a request, which waits for one anyway (AMUSD_QUEUE_TIMEOUT_S)."""
        limit = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + limit
        while (status := await self.status()).verifiers == 0:
            if time.monotonic() >= deadline:
                raise NoWorkerError(f"no verify worker registered within {limit:g}s")
            await asyncio.sleep(min(READY_POLL_S, max(0.0, deadline - time.monotonic())))
        return status

    async def wait_closed(self) -> ClientClosedError:
        """Until the connection is gone (closed, or its reader failed); returns why."""
        await self._gone.wait()
        return self._closed

    async def _send(self, msg: p.Message) -> None:
        if self._closed is not None:
            raise self._closed
        try:
            await send(self._sock, msg, limit=self.welcome.max_message_bytes if self.welcome else None)
        except p.ProtocolError as exc:
            raise RequestTooLargeError(f"the request was not sent: {exc} (AMUSD_MAX_MESSAGE_BYTES)") from None
        except zmq.ZMQError as exc:
            raise ClientClosedError(f"the client's connection failed: {exc}") from None

    async def _ask(self, kind: type, reply: type) -> p.Message:
        """A call (hello, status): its answer, or the refusal of it, comes back under its own req_id."""
        req_id = uuid.uuid4().hex
        self._calls[req_id] = answer = asyncio.get_running_loop().create_future()
        try:
            await self._send(kind(req_id=req_id))
            async with asyncio.timeout(self.timeout_s):
                got = await answer
            if isinstance(got, p.Error):
                raise _raised(got)
            if not isinstance(got, reply):
                raise AmusdError(f"the coordinator answered {kind.TYPE} with {got.TYPE}")
            return got
        except TimeoutError:
            # A CURVE refusal looks the same from here as nothing listening: name it as a possible cause.
            hint = "refused this client's CURVE key" if self.keys else "requires CURVE keys, which this client lacks"
            raise CoordinatorUnavailableError(
                f"no answer from a coordinator at {self.url} within {self.timeout_s:g}s (or it {hint})") from None
        finally:
            del self._calls[req_id]

    def _restarted(self, instance: str) -> None:
        """A new coordinator answers at the address: the old one's requests are gone, so fail them now rather
        than wait forever (this one answers pings)."""
        self.welcome.instance = instance
        for req_id, queue in self._streams.items():
            queue.put_nowait(p.Error(code=Code.COORDINATOR_RESTARTED, req_id=req_id,
                                     message="the coordinator restarted and lost the request; submit it again"))

    async def _read(self) -> None:
        try:
            while True:
                try:
                    _, msgs = await recv(self._sock, self.max_bytes, routed=False)
                except p.ProtocolError:
                    continue  # a garbled frame can't be routed to a request; its request times out instead
                self._last_heard = time.monotonic()
                for msg in msgs:
                    self._route(msg)
        except Exception as exc:  # whatever it was, nobody would hear from the coordinator again
            self._fail_all(ClientClosedError(f"the client stopped reading its connection: {exc!r}"))
            raise

    def _route(self, msg: p.Message) -> None:
        if isinstance(msg, p.Pong) and self.welcome is not None and msg.instance != self.welcome.instance:
            self._restarted(msg.instance)
        req_id = getattr(msg, "req_id", None)
        if req_id in self._streams:
            self._streams[req_id].put_nowait(msg)
        elif req_id in self._calls:
            if not self._calls[req_id].done():
                self._calls[req_id].set_result(msg)
        elif isinstance(msg, p.Error) and req_id is None:
            # No call or stream of this client waits on it, so none is failed by it, now or later.
            self.unattributed[msg.code] += 1
            log.warning("the coordinator refused a frame it could not attribute (%s): %s", msg.code, msg.message)

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.welcome.heartbeat_s)
            if self._streams:
                await self._send(p.Ping())

    async def generate(self, prompt: str | None = None, **kwargs) -> GenerationResult:
        """Generate to completion. Arguments as for stream()."""
        stream = self.stream(prompt, **kwargs)
        async for _ in stream:
            pass
        return stream.result

    def stream(self, prompt: str | None = None, **kwargs) -> "Stream":
        """Committed tokens as they are decided, in order, each exactly once; `.result` once exhausted.

        prompt, prompt_ids=[...] or messages=[{"role": ..., "content": ...}] (a chat, rendered with the verify model's
        chat template); max_new_tokens; stop_token_ids=[]; stop=[] (strings: the text ends before the first to
        appear, and the request there); ignore_eos=False; lookahead=None;
        deadline_s=None (overall limit for this request); policy="eager" ("amusd": the original verifier's
        wait-for-two policy, for benchmarks). Sampling: temperature=0.0, top_k=0 (no limit), top_p=1.0, seed=None
        (the coordinator picks one, reported as stats["seed"]) and sampling_mode: "greedy", "seeded" (the
        verify model's own sample for that seed, token for token) or "exact" (its output distribution); by
        default greedy at temperature 0 and exact above.
        """
        result = GenerationResult([], "", "", [])
        return Stream(self._run(prompt, result=result, **kwargs), result)

    async def _run(self, prompt: str | None, *, result: GenerationResult, max_new_tokens: int,
                   prompt_ids: list[int] | None = None, messages: list[dict[str, str]] | None = None,
                   stop_token_ids=(), stop=(), ignore_eos: bool = False,
                   lookahead: int | None = None, deadline_s: float | None = None, policy: str = Policy.EAGER,
                   temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                   sampling_mode: str | None = None) -> AsyncIterator[Chunk]:
        msg = _request(prompt, prompt_ids, messages, max_new_tokens, stop_token_ids, stop, ignore_eos, lookahead,
                       policy, temperature, top_k, top_p, seed, sampling_mode)
        if deadline_s is not None and not (type(deadline_s) in (int, float) and deadline_s > 0):
            raise InvalidRequestError(f"deadline_s must be a number > 0, not {deadline_s!r}")
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[msg.req_id] = queue  # before sending: the answer may come before the send returns
        deadline = time.monotonic() + deadline_s if deadline_s is not None else None
        received = 0
        finished = False
        try:
            try:
                await self._send(msg)
            except RequestTooLargeError:
                finished = True  # never sent: nothing to cancel
                raise
            self._last_heard = time.monotonic()
            while True:
                reply = await self._next(queue, deadline)
                if isinstance(reply, p.Tokens):
                    if reply.start != received:
                        raise AmusdError(f"stream out of order: got position {reply.start}, expected {received}")
                    received += len(reply.token_ids)
                    result.token_ids.extend(reply.token_ids)
                    result.text += reply.text
                    yield Chunk(reply.token_ids, reply.text)
                elif isinstance(reply, p.Done):
                    finished = True
                    result.finish_reason, result.prompt_ids, result.stats = (
                        reply.finish_reason, reply.prompt_ids, reply.stats)
                    return
                elif isinstance(reply, p.Error):
                    finished = True
                    raise _raised(reply)
        finally:
            if self._streams.pop(msg.req_id, None) is not None and not finished:
                # Abandoned: closed early, broken out of, collected, failed or cancelled. Shielded, since a task
                # cancelled again while the cancel is being sent would otherwise leave the request running.
                await asyncio.shield(self._cancel(msg.req_id))

    async def _next(self, queue: asyncio.Queue, deadline: float | None) -> p.Message:
        """The next message for a request; raises when the coordinator is silent or the client closed."""
        interval = self.timeout_s / 4
        while True:
            wait = interval if deadline is None else min(interval, deadline - time.monotonic())
            if wait <= 0:
                raise RequestTimeoutError("the request's deadline passed before it finished")
            try:
                # Not wait_for: on Python 3.11 it can return a message and swallow a cancel that came at the same
                # moment, and the abandoned request would then run to its end.
                async with asyncio.timeout(wait):
                    got = await queue.get()
            except TimeoutError:
                if time.monotonic() - self._last_heard > self.timeout_s:
                    raise CoordinatorUnavailableError(
                        f"the coordinator at {self.url} has been silent for {self.timeout_s:g}s") from None
                continue
            if isinstance(got, AmusdError):
                raise got
            return got


class Stream:
    """An async iterator of Chunks; `result` fills in as they arrive and is complete at the end. Leaving it before
    the end cancels the request: at once with `aclose()` or at the end of `async with`, else when it is dropped."""

    def __init__(self, chunks: AsyncIterator[Chunk], result: GenerationResult):
        self._chunks = chunks
        self.result = result

    def __aiter__(self) -> "Stream":
        return self

    async def __anext__(self) -> Chunk:
        return await self._chunks.__anext__()

    async def aclose(self) -> None:
        await self._chunks.aclose()

    async def __aenter__(self) -> "Stream":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()


def _raised(error: p.Error) -> AmusdError:
    """What a refusal or failure raises: a failure mid-way carries its committed tokens."""
    if error.token_ids or error.code not in ERRORS:
        return RequestFailedError(f"{error.code}: {error.message}", error.code, error.token_ids)
    return ERRORS[error.code](error.message)


def _request(prompt, prompt_ids, messages, max_new_tokens, stop_token_ids, stop, ignore_eos, lookahead, policy,
             temperature, top_k, top_p, seed, mode) -> p.Generate:
    """The message a request sends, checked as the coordinator will check it (there also against the model)."""
    msg = p.Generate(req_id=uuid.uuid4().hex, max_new_tokens=max_new_tokens, prompt=prompt,
                     prompt_ids=None if prompt_ids is None else list(prompt_ids), messages=messages,
                     stop_token_ids=list(stop_token_ids), stop=list(stop), ignore_eos=bool(ignore_eos),
                     lookahead=lookahead, policy=policy, temperature=_float(temperature), top_k=top_k,
                     top_p=_float(top_p), seed=seed, sampling_mode=mode)
    try:
        msg.sampling_mode = validate.request(msg, seed or 0).mode
    except validate.Invalid as exc:
        raise InvalidRequestError(str(exc)) from None
    return msg


def _float(value):
    """A Python int where the wire wants a float; anything else as it is, for the check to name."""
    return float(value) if type(value) is int else value
