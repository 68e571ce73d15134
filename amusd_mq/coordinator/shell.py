"""The coordinator service: the sockets and the clock around the core, which makes every decision.

Sockets: one ROUTER at the configured URL for clients and workers; one PUB next to it for Commit/Beat. Each frame
received goes to the core with the time, and what the core returns leaves in one frame per receiver; its prompts
are tokenized on a thread of their own and handed back.
"""
from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import zmq
import zmq.asyncio

from ..config import COORDINATOR, Config, ConfigurationError, pub_url
from ..tasks import TaskEnded, first_to_end
from ..text import vocab
from ..wire import protocol as p
from ..wire.security import Gate, load_keys, secure
from ..wire.transport import ensure_free, make_socket, recv, send_all
from .core import Core, Out, Tokenize

log = logging.getLogger(__name__)


class Coordinator:
    def __init__(self, cfg: Config, ctx: zmq.asyncio.Context | None = None):
        self.cfg = cfg
        self.ctx = ctx or zmq.asyncio.Context.instance()
        self.router = make_socket(self.ctx, zmq.ROUTER, cfg.max_message_bytes)
        self.pub = make_socket(self.ctx, zmq.PUB, cfg.max_message_bytes)
        self.keys = load_keys(COORDINATOR, cfg.curve_secret_key, cfg.curve_allow_dir)
        secure(self.router, self.keys)
        secure(self.pub, self.keys)
        self.core: Core | None = None  # made once the vocabulary is loaded, when run starts
        self.tokenizer_thread = ThreadPoolExecutor(1, thread_name_prefix="tokenize")
        self.tokenizing: dict[str, asyncio.Future] = {}

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until stopped. Raises ConfigurationError when it can't listen, and whatever ends a core task."""
        self._listen(bind=False)
        log.info("loading the vocabulary of %s", self.cfg.verify_model)
        loaded = await first_to_end(stop, [asyncio.to_thread(vocab.load, self.cfg.verify_model, self.cfg.cache_dir)])
        if loaded is None:
            return
        self.core = Core(self.cfg, loaded.result())
        gate = Gate(self.ctx, self.keys, self.core.rejects) if self.keys else None
        self._listen(bind=True)
        log.info("coordinator listening on %s (pub %s)", self.cfg.coordinator_url, pub_url(self.cfg.coordinator_url))
        try:
            ended = await first_to_end(stop, [self._serve(), self._tick()] + ([gate.count_refusals(self.router)]
                                                                             if gate else []))
            if ended is not None:
                raise TaskEnded(f"{ended.get_coro().__qualname__} stopped")
        finally:
            await self._deliver(self.core.shutdown(time.monotonic()))
            self.tokenizer_thread.shutdown(wait=False, cancel_futures=True)
            self.router.close()
            self.pub.close()
            if gate:
                gate.stop()

    def _listen(self, bind: bool) -> None:
        """Check that the ROUTER's and the PUB's addresses are free, or bind them: ConfigurationError if taken."""
        for sock, url in ((self.router, self.cfg.coordinator_url), (self.pub, pub_url(self.cfg.coordinator_url))):
            try:
                if bind:
                    sock.bind(url)
                else:
                    ensure_free(url)
            except (OSError, zmq.ZMQError) as exc:
                raise ConfigurationError(f"cannot listen at {url}: {exc}") from None

    async def _serve(self) -> None:
        while True:
            try:
                identity, msgs = await recv(self.router, self.cfg.max_message_bytes, routed=True)
            except p.ProtocolError as exc:
                await self._deliver(self.core.refused(getattr(exc, "identity", None), exc, time.monotonic()))
                continue
            await self._deliver(self.core.handle(identity, msgs, time.monotonic()))

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.heartbeat_s)
            await self._deliver(self.core.tick(time.monotonic()))

    async def _deliver(self, out: Out) -> None:
        for job in out.tokenize:
            self.tokenizing[job.rid] = asyncio.ensure_future(self._tokenize(job))
        for rid in out.untokenize:
            self.tokenizing.pop(rid).cancel()  # one not yet begun is skipped; a running one's ids are ignored
        for receiver, msgs in out.messages.items():
            await send_all(self.pub if receiver is None else self.router, msgs, self.cfg.max_message_bytes, receiver)

    async def _tokenize(self, job: Tokenize) -> None:
        try:
            ids = await asyncio.get_running_loop().run_in_executor(self.tokenizer_thread, job.run)
        except Exception as exc:  # the core says what it means for the request
            ids = exc
        self.tokenizing.pop(job.rid, None)
        await self._deliver(self.core.tokenized(job.rid, ids, time.monotonic()))
