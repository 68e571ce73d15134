"""The client against a scripted coordinator: what it does when its own reading fails."""
import asyncio
import tempfile

import pytest
import zmq
import zmq.asyncio

from amusd_mq import AsyncClient
from amusd_mq.frontend.client import ClientClosedError
from amusd_mq.wire import protocol as p

pytestmark = pytest.mark.asyncio


class BrokenRouting(AsyncClient):
    """A client with a bug: routing a pong raises."""

    def _route(self, msg: p.Message) -> None:
        if isinstance(msg, p.Pong):
            raise RuntimeError("a bug in routing")
        super()._route(msg)


async def welcome(router) -> bytes:
    """Answer a client's hello as a coordinator would; returns the client's identity."""
    identity, frame = await router.recv_multipart()
    await router.send_multipart([identity, p.encode(p.Welcome(
        req_id=p.decode(frame, 1 << 20).req_id, instance="i", model="m", verifiers=1, drafts=0, vocab_size=300,
        max_context=64, eos_token_ids=[], heartbeat_s=1.0, max_message_bytes=1 << 22))])
    return identity


async def test_a_reader_that_fails_fails_every_waiting_request_at_once():
    """Any exception in the receive loop, not only a garbled frame: every request waiting on the connection raises
    a ClientClosedError naming it, long before the client's silence timeout."""
    url = f"ipc://{tempfile.mkdtemp(prefix='amc-')}/c"
    ctx = zmq.asyncio.Context()
    router = ctx.socket(zmq.ROUTER)
    router.bind(url)

    async def coordinator():
        identity = await welcome(router)
        for _ in range(3):
            await router.recv_multipart()  # the three requests, left unanswered
        await router.send_multipart([identity, p.encode(p.Pong(instance="i"))])

    script = asyncio.create_task(coordinator())
    client = BrokenRouting(url, timeout_s=60)
    try:
        await client.connect()
        waiting = [asyncio.create_task(client.generate(prompt_ids=[1, 2], max_new_tokens=4)) for _ in range(3)]
        done, _ = await asyncio.wait(waiting, timeout=5)
        assert len(done) == 3
        for task in done:
            with pytest.raises(ClientClosedError, match="a bug in routing"):
                task.result()
        with pytest.raises(ClientClosedError):
            await client.generate(prompt_ids=[1], max_new_tokens=1)
        assert "a bug in routing" in str(await asyncio.wait_for(client.wait_closed(), 1))
    finally:
        await client.close()
        await script
        router.close(0)
        ctx.term()


class CancelledAsTokensArrive(AsyncClient):
    """Cancels its consumer in the very step a request's first tokens are delivered."""

    def consume(self, **request) -> asyncio.Task:
        self._consumer = asyncio.create_task(self.generate(**request))
        return self._consumer

    def _route(self, msg: p.Message) -> None:
        super()._route(msg)
        if isinstance(msg, p.Tokens):
            self._consumer.cancel()


async def test_a_cancel_that_comes_with_a_message_still_cancels_the_request():
    """A request whose waiter is cancelled just as a message for it arrives must still be cancelled at the
    coordinator (asyncio.wait_for on Python 3.11 returned the message and swallowed the cancel)."""
    url = f"ipc://{tempfile.mkdtemp(prefix='amc-')}/c"
    ctx = zmq.asyncio.Context()
    router = ctx.socket(zmq.ROUTER)
    router.bind(url)

    async def coordinator() -> p.Message:
        identity = await welcome(router)
        _, frame = await router.recv_multipart()
        generate = p.decode(frame, 1 << 20)
        await router.send_multipart([identity, p.encode(p.Tokens(req_id=generate.req_id, start=0, token_ids=[7],
                                                                 text="x"))])
        _, frame = await asyncio.wait_for(router.recv_multipart(), 5)
        return p.decode(frame, 1 << 20)

    script = asyncio.create_task(coordinator())
    client = CancelledAsTokensArrive(url, timeout_s=5)
    try:
        await client.connect()
        consumer = client.consume(prompt_ids=[1, 2], max_new_tokens=4)
        with pytest.raises(asyncio.CancelledError):
            await consumer
        assert isinstance(await script, p.Cancel)
    finally:
        await client.close()
        router.close(0)
        ctx.term()
