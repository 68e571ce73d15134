"""The OpenAI-compatible HTTP gateway: a client of the coordinator like any other, so several can front one
deployment.

Built on FastAPI and uvicorn, the stack vLLM and SGLang serve their OpenAI APIs with: request bodies are
pydantic models (openai_api.py), and uvicorn runs on uvloop, the event loop of every other service here. It
listens at once and connects to the coordinator in the background, so a request sent while the services are
still starting waits for them instead of failing.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import socket
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable

import uvicorn
from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST

from ..config import Config
from ..wire import protocol as p
from .client import AmusdError, AsyncClient, Chunk, CoordinatorUnavailableError, GenerationResult
from .metrics import Metrics
from .openai_api import (
    CHAT_MAX_TOKENS,
    COMPLETION_MAX_TOKENS,
    APIError,
    ChatRequest,
    CompletionRequest,
    Reply,
    SamplingBody,
    api_error,
    models_body,
)

log = logging.getLogger(__name__)
HEALTH_TIMEOUT_S = 2.0  # a probe or a scrape waits no longer for the coordinator's status
# A body may be this many times the frame limit: JSON's escapes (\uXXXX) write non-ASCII text up to 3 times as long
# as its UTF-8, so a larger body can't become a request that fits one frame.
BODY_PER_FRAME = 3


class Disconnected(Exception):
    """The HTTP client went away before its response was ready: its requests were cancelled."""


class BodyLimit:
    """Refuses a body too large to become a request (413) before it is read: parsing a 100 MiB JSON body only to
    refuse the request would hold the gateway for seconds. A body of declared length is refused at once; one sent
    in chunks, once it has grown past the limit."""

    def __init__(self, app, limit: int, refused: Callable[[], None]):
        self.app, self.limit, self.refused = app, limit, refused

    def error(self, size: str) -> APIError:
        return APIError(413, f"a request body of {size} bytes exceeds the limit of {self.limit} "
                             f"({BODY_PER_FRAME} x AMUSD_MAX_MESSAGE_BYTES)", "invalid_request_error", "body_too_large")

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            self.refused()
            error = self.error(length.decode())
            return await JSONResponse(error.body(), status_code=error.status)(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise self.error(f"more than {self.limit}")  # answered by the app's APIError handler
            return message

        await self.app(scope, counted, send)


class Gateway:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.metrics = Metrics()
        self.model = cfg.verify_model  # replaced by the coordinator's own, once connected
        self.started = int(time.time())
        self._client: AsyncClient | None = None
        self._connected = asyncio.Event()

    def app(self) -> FastAPI:
        app = FastAPI(title="amusd-mq", lifespan=self._lifespan)
        app.add_exception_handler(APIError, self._api_error)
        app.add_exception_handler(AmusdError, self._client_error)
        app.add_exception_handler(RequestValidationError, self._invalid)
        app.post("/v1/completions")(self.completions)
        app.post("/v1/chat/completions")(self.chat)
        app.get("/v1/models")(self.models)
        app.get("/health")(self.health)
        app.get("/metrics")(self.scrape)
        app.add_middleware(BodyLimit, limit=BODY_PER_FRAME * self.cfg.max_message_bytes,
                           refused=self.metrics.failed.labels("413").inc)
        return app

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: FastAPI):
        connecting = asyncio.create_task(self._keep_connected())
        yield
        connecting.cancel()
        await asyncio.gather(connecting, return_exceptions=True)
        if self._client is not None:
            await self._client.close()

    async def _keep_connected(self) -> None:
        """Connect to the coordinator, and again whenever the connection is lost."""
        while True:
            client = AsyncClient(self.cfg.coordinator_url, timeout_s=self.cfg.timeout_s,
                                 max_message_bytes=self.cfg.max_message_bytes,
                                 curve_secret_key=self.cfg.curve_secret_key, curve_server_key=self.cfg.curve_server_key)
            try:
                await client.connect()
            except CoordinatorUnavailableError as exc:
                log.warning("%s; trying again", exc)
                continue
            self.model, self._client = client.welcome.model, client
            self._connected.set()
            log.info("connected to the coordinator at %s, serving %s", self.cfg.coordinator_url, self.model)
            why = await client.wait_closed()
            self._connected.clear()
            self._client = None
            log.warning("lost the coordinator connection (%s); connecting again", why)
            await client.close()

    async def _ready_client(self) -> AsyncClient:
        try:
            async with asyncio.timeout(self.cfg.timeout_s):
                await self._connected.wait()
        except TimeoutError:
            raise CoordinatorUnavailableError(f"no coordinator answered at {self.cfg.coordinator_url} within "
                                              f"{self.cfg.timeout_s:g}s") from None
        return self._client

    # errors

    async def _api_error(self, request: Request, exc: APIError) -> JSONResponse:
        self.metrics.failed.labels(str(exc.status)).inc()
        return JSONResponse(exc.body(), status_code=exc.status)

    async def _client_error(self, request: Request, exc: AmusdError) -> JSONResponse:
        return await self._api_error(request, api_error(exc))

    async def _invalid(self, request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [f"{'.'.join(map(str, e['loc'][1:])) or 'body'}: {e['msg']}" for e in exc.errors()]
        param = ".".join(map(str, exc.errors()[0]["loc"][1:])) if exc.errors() else None
        return await self._api_error(request, APIError(400, "; ".join(problems), "invalid_request_error", param=param))

    def _authorize(self, authorization: str | None) -> None:
        if self.cfg.api_key and not hmac.compare_digest(authorization or "", f"Bearer {self.cfg.api_key}"):
            raise APIError(401, "a valid API key is required: 'Authorization: Bearer <key>'", "authentication_error",
                           "invalid_api_key")

    # endpoints

    async def completions(self, body: CompletionRequest, request: Request,
                          authorization: str | None = Header(None)) -> Response:
        return await self._serve(body, request, authorization, "completion", COMPLETION_MAX_TOKENS)

    async def chat(self, body: ChatRequest, request: Request, authorization: str | None = Header(None)) -> Response:
        return await self._serve(body, request, authorization, "chat", CHAT_MAX_TOKENS)

    async def models(self, authorization: str | None = Header(None)) -> dict:
        self._authorize(authorization)
        await self._ready_client()
        return models_body(self.model, self.started)

    async def health(self) -> JSONResponse:
        """200 while a healthy verify worker is registered, else 503, at once."""
        status = await self._status()
        verifiers = status.verifiers if status else 0
        return JSONResponse({"status": "ok" if verifiers else "unavailable", "coordinator": status is not None,
                             "verifiers": verifiers, "drafts": status.drafts if status else 0,
                             "unhealthy": status.unhealthy if status else 0},
                            status_code=200 if verifiers else 503)

    async def scrape(self) -> Response:
        return Response(self.metrics.exposition(await self._status()), media_type=CONTENT_TYPE_LATEST)

    async def _status(self) -> p.StatusReply | None:
        if self._client is None:
            return None
        try:
            async with asyncio.timeout(HEALTH_TIMEOUT_S):
                return await self._client.status()
        except (AmusdError, TimeoutError):
            return None

    # generation

    async def _serve(self, body: SamplingBody, request: Request, authorization: str | None, kind: str,
                     default_max_tokens: int) -> Response:
        self._authorize(authorization)
        prompts = body.prompts()
        args = body.arguments(default_max_tokens)
        client = await self._ready_client()
        if body.model not in (None, self.model):
            raise APIError(404, f"the model {body.model!r} does not exist; this server serves {self.model!r}",
                           "invalid_request_error", "model_not_found", "model")
        out = Reply(kind, self.model)
        try:
            if not body.stream:
                return JSONResponse(out.body(await _unless_disconnected(request, self._all(client, prompts, args))))
            events = self._events(client, out, prompts, args, body.include_usage)
            # Wait for the first token before answering, so that a refused request gets its HTTP status.
            first = await _unless_disconnected(request, anext(events))
        except Disconnected:
            return Response(status_code=499)  # nobody reads it: the status a proxy would log
        return EventStream(first, events)

    async def _generate(self, client: AsyncClient, prompt: dict, args: dict,
                        on_chunk: Callable[[Chunk], None] | None = None) -> GenerationResult:
        timer = self.metrics.timer()
        async with client.stream(**prompt, **args) as stream:
            async for chunk in stream:
                timer.tokens_arrived(len(chunk.token_ids))
                if on_chunk is not None:
                    on_chunk(chunk)
        timer.done()
        self.metrics.finished(stream.result)
        return stream.result

    async def _all(self, client: AsyncClient, prompts: list[dict], args: dict) -> list[GenerationResult]:
        """Every prompt's result; when one fails, the others are cancelled."""
        tasks = [asyncio.ensure_future(self._generate(client, prompt, args)) for prompt in prompts]
        try:
            return await asyncio.gather(*tasks)
        finally:
            await _cancel_all(tasks)

    async def _events(self, client: AsyncClient, out: Reply, prompts: list[dict], args: dict,
                      include_usage: bool) -> AsyncGenerator[str, None]:
        """Server-sent events: every prompt's chunks as they come, then the usage if asked, then [DONE]. An error
        after the first event ends the stream with an error event, as vLLM's do."""
        events: asyncio.Queue = asyncio.Queue()

        async def run(index: int, prompt: dict) -> None:
            try:
                result = await self._generate(client, prompt, args, lambda c: events.put_nowait((index, c.text, None)))
                events.put_nowait((index, "", result))
            except AmusdError as exc:
                events.put_nowait((index, "", api_error(exc)))

        tasks = [asyncio.create_task(run(i, prompt)) for i, prompt in enumerate(prompts)]
        results: dict[int, GenerationResult] = {}
        started: set[int] = set()
        try:
            while len(results) < len(prompts):
                index, text, end = await events.get()
                if isinstance(end, APIError):
                    if not started:  # nothing sent yet: the request fails with its own status
                        raise end
                    self.metrics.failed.labels(str(end.status)).inc()
                    yield _sse(end.body())
                    break
                if not text and end is None:
                    continue
                yield _sse(out.chunk(index, text, end, first=index not in started))
                started.add(index)
                if end is not None:
                    results[index] = end
            else:
                if include_usage:
                    yield _sse(out.usage_chunk([results[i] for i in sorted(results)]))
            yield "data: [DONE]\n\n"
        finally:
            await _cancel_all(tasks)


class EventStream(StreamingResponse):
    """Server-sent events whose generator is closed however the response ends, so that a client that disconnects
    cancels its requests at once, not whenever the garbage collector reaches the abandoned generator."""

    def __init__(self, first: str, events: AsyncGenerator[str, None]):
        self._events = events
        super().__init__(_chained(first, events), media_type="text/event-stream")

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._events.aclose()


def _sse(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


async def _chained(first: str, rest: AsyncIterator[str]) -> AsyncIterator[str]:
    yield first
    async for event in rest:
        yield event


async def _cancel_all(tasks: list[asyncio.Future]) -> None:
    """Cancelling a generation's task cancels its request at the coordinator, which frees its workers."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def _unless_disconnected(request: Request, work: Awaitable):
    """The work's result, or Disconnected (the work cancelled) if the HTTP client goes away first."""
    work = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():
            await _cancel_all([work])
    if work.cancelled():
        raise Disconnected
    return work.result()


async def _disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


class _Server(uvicorn.Server):
    """uvicorn's server, ending with status 0 when stopped by SIGINT or SIGTERM, as the other services do: uvicorn
    itself raises the signal again once it has shut down."""

    def handle_exit(self, sig: int, frame) -> None:
        super().handle_exit(sig, frame)
        self._captured_signals.clear()


def serve(cfg: Config, listener: socket.socket) -> int:
    """Serve on a listening socket until SIGINT or SIGTERM."""
    gateway = Gateway(cfg)
    server = _Server(uvicorn.Config(gateway.app(), loop="uvloop", log_level=cfg.log_level.lower(),
                                    timeout_graceful_shutdown=5))
    log.info("gateway on http://%s:%d, coordinator %s", cfg.http_host, cfg.http_port, cfg.coordinator_url)
    server.run(sockets=[listener])
    return 0
