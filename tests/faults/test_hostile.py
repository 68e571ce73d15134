"""Hostile and careless peers, through real processes: no frame, prompt, client or restart may stall the service.

Each case once stopped the service without touching a token: a frame that made the coordinator deaf, a prompt
that froze its event loop, workers that came back ever more slowly after restarts, a wrong vocabulary that
locked out the real verifier, a vanished client that held the workers, one client's flood that starved
another, and a temperature that killed the draft's request task.
"""
import asyncio
import gc
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import pytest
from conftest import raw_exchange
from test_verifier_loss import PROMPT

from amusd_mq import (
    AsyncClient,
    ClientClosedError,
    CoordinatorUnavailableError,
    InvalidRequestError,
    OverloadedError,
    RequestFailedError,
    RequestTooLargeError,
)
from amusd_mq.wire import protocol as p

pytestmark = pytest.mark.asyncio
CLIENT = str(Path(__file__).with_name("client_process.py"))
WINDOW_S = 0.25 * 5  # the deploy fixture's heartbeat interval x liveness
V = p.PROTOCOL_VERSION
POISON = {  # each once raised something other than ProtocolError in the coordinator's receive loop, or slipped by
    "unknown_type": [msgpack.packb({"v": V, "t": [1]}), msgpack.packb({"v": V, "t": {"a": 1}}),
                     msgpack.packb({"v": V, "t": b"hello"})],
    "malformed": [msgpack.packb({"v": V, "t": "hello", b"x": 1}), msgpack.packb({"v": V, b"t": "hello"}),
                  b"\x91" * 100_000 + b"\x00"],
    "version": [msgpack.packb({"v": True, "t": "hello"}), msgpack.packb({"v": float(V), "t": "hello"}),
                msgpack.packb({"v": 2**64 - 1, "t": "hello"})],
    "field": [msgpack.packb({"v": V, "t": "generate", "req_id": "r", "max_new_tokens": 2**64 - 1, "prompt": "x"}),
              msgpack.packb({"v": V, "t": "cancel", "req_id": msgpack.ExtType(7, b"\x00")})],
}


def expected(tiny_verify, reference, prompt, n):
    return reference(tiny_verify.tokenizer(prompt)["input_ids"], n)


async def first_chunk(stream) -> asyncio.Task:
    """Consume a stream in the background; returns once its first tokens are in. The task returns all of them."""
    arrived = asyncio.Event()

    async def consume():
        ids = []
        async for chunk in stream:
            ids += chunk.token_ids
            arrived.set()
        return ids

    task = asyncio.create_task(consume())
    await asyncio.wait({task, asyncio.create_task(arrived.wait())}, return_when=asyncio.FIRST_COMPLETED)
    return task


async def test_poison_frames_mid_generation_are_refused_counted_and_survived(deploy, reference, tiny_verify):
    d = deploy(AMUSD_VERIFY_DELAY_MS=10)
    d.start("verify", name="verify-b")  # free to serve the generation asked for right after the poison
    await d.wait_ready(verifiers=2, timeout_s=120)
    frames = [frame for kind in POISON.values() for frame in kind]
    async with AsyncClient(d.url, timeout_s=30) as client:
        running = await first_chunk(client.stream(PROMPT, max_new_tokens=60))
        replies = await raw_exchange(d.url, [[frame] for frame in frames])
        assert [r.code for r in replies] == [kind for kind, group in POISON.items() for _ in group]
        start = time.monotonic()
        await raw_exchange(d.url, [[p.encode(p.Hello(req_id="h"))]], timeout_s=1.0)  # still answering, within a second
        quick = await client.generate("Hello, world", max_new_tokens=8)
        assert time.monotonic() - start < 1.0
        assert quick.token_ids == expected(tiny_verify, reference, "Hello, world", 8)
        assert await running == expected(tiny_verify, reference, PROMPT, 60)
        status = await client.status()
    for kind, group in POISON.items():
        assert status.rejected[kind] >= len(group), (kind, status.rejected)


async def test_a_multi_megabyte_prompt_is_refused_at_once_beside_one_that_completes(deploy, reference, tiny_verify):
    d = deploy(AMUSD_VERIFY_DELAY_MS=10)
    await d.wait_ready(timeout_s=120)
    async with AsyncClient(d.url, timeout_s=30) as client:
        normal = asyncio.create_task(client.generate(PROMPT, max_new_tokens=60))
        start = time.monotonic()
        with pytest.raises(InvalidRequestError) as refused:
            await client.generate("x" * (3 << 20), max_new_tokens=4)  # tokenizing it took seconds on the loop
        assert time.monotonic() - start < 1.0
        assert "can't fit the model context" in str(refused.value)
        assert (await normal).token_ids == expected(tiny_verify, reference, PROMPT, 60)


async def test_prompts_over_the_frame_limit_fail_within_a_second_and_nothing_else_does(deploy, reference, tiny_verify):
    """A 5 MiB prompt once waited forever: the coordinator refused its frame with an error naming no request, which
    the client filed for its next call (a status() that then failed with it)."""
    d = deploy(AMUSD_VERIFY_DELAY_MS=10)
    await d.wait_ready(timeout_s=120)
    async with AsyncClient(d.url, timeout_s=30) as client:
        normal = asyncio.create_task(client.generate(PROMPT, max_new_tokens=60))
        for mib in (5, 20, 100):
            start = time.monotonic()
            with pytest.raises(RequestTooLargeError, match="limit of 4194304"):
                async with asyncio.timeout(1.0):
                    await client.generate("x" * (mib << 20), max_new_tokens=4)
            assert time.monotonic() - start < 1.0
        assert (await client.status()).verifiers == 1
        assert (await normal).token_ids == expected(tiny_verify, reference, PROMPT, 60)
    # A peer that sends one anyway hears of it under its request's id, read from the frame's head.
    big = p.encode(p.Generate(req_id="big", max_new_tokens=4, prompt="x" * (5 << 20)))
    (refusal,) = await raw_exchange(d.url, [[big]], timeout_s=5.0)
    assert (refusal.code, refusal.req_id) == ("oversized", "big")


async def test_a_refusal_that_names_no_request_fails_no_later_call(deploy):
    d = deploy(roles=("coordinator",))
    await d.wait_ready(verifiers=0, drafts=0, timeout_s=60)
    async with AsyncClient(d.url, timeout_s=30) as client:
        await client._sock.send(b"\xc1 not msgpack")  # a frame of this client's that no request can be named by
        async with asyncio.timeout(5):
            while not client.unattributed["malformed"]:
                await asyncio.sleep(0.05)
        assert (await client.status()).rejected["malformed"] == 1


async def test_workers_are_back_within_3s_of_each_of_three_coordinator_restarts(deploy):
    d = deploy(AMUSD_HEARTBEAT_S=1.0)  # the default: backoff once grew 1, 2, 4 s and never came down
    await d.wait_ready(timeout_s=120)
    name = "coordinator"
    for i in range(3):
        old = d.procs.pop(name)
        old.kill()
        old.wait()
        name = f"coordinator{i}"
        d.start("coordinator", name=name)
        up = await welcome_when(d, lambda w: True)
        back = await welcome_when(d, lambda w: w.verifiers == 1 and w.drafts == 1)
        assert back - up < 3.0, f"restart {i + 1}: workers back {back - up:.1f}s after the coordinator"
    async with AsyncClient(d.url, timeout_s=30) as client:
        assert (await client.generate(PROMPT, max_new_tokens=8)).finish_reason in ("stop", "length")


async def welcome_when(d, ready, timeout_s: float = 60.0) -> float:
    """Poll the coordinator until its welcome satisfies `ready`; returns when it did."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        d.check_alive()
        try:
            async with AsyncClient(d.url, timeout_s=0.3) as client:
                if ready(client.welcome):
                    return time.monotonic()
        except CoordinatorUnavailableError:
            pass
        await asyncio.sleep(0.05)
    raise TimeoutError("the coordinator never reached the expected state")


async def test_a_wrong_vocabulary_registering_first_locks_nobody_out(deploy, odd_draft, reference, tiny_verify):
    d = deploy(roles=("coordinator",))
    await d.wait_ready(verifiers=0, drafts=0, timeout_s=60)
    odd = d.start("draft", name="odd", AMUSD_DRAFT_MODEL=odd_draft)
    assert await asyncio.to_thread(odd.wait, 60) == 2
    assert "different vocabulary from tiny-verify" in d.log_tail("odd")
    d.procs.pop("odd")
    d.start("verify")
    d.start("draft")
    await d.wait_ready(timeout_s=120)  # the real pair registers, whoever came first
    async with AsyncClient(d.url, timeout_s=30) as client:
        r = await client.generate(PROMPT, max_new_tokens=20)
    assert r.token_ids == expected(tiny_verify, reference, PROMPT, 20)


async def test_a_killed_client_frees_its_workers_within_the_liveness_window(deploy, reference, tiny_verify):
    d = deploy(AMUSD_VERIFY_DELAY_MS=10, AMUSD_MAX_BATCH=1)  # one at a time: the next waits until it is freed
    await d.wait_ready(timeout_s=120)
    proc = subprocess.Popen([sys.executable, CLIENT, d.url, PROMPT, "2000", "--ignore-eos"], stdout=subprocess.PIPE)
    try:
        first = await asyncio.to_thread(proc.stdout.readline)  # its first tokens: the request is running
        assert b"ids" in first
    finally:
        proc.kill()
        proc.wait()
    async with AsyncClient(d.url, timeout_s=30) as client:
        r = await client.generate("Hello, world", max_new_tokens=8)
        status = await client.status()
    assert r.token_ids == expected(tiny_verify, reference, "Hello, world", 8)
    assert r.stats["queue_s"] < WINDOW_S  # it took 2000 tokens' time, 20 s and more, before
    assert status.clients_lost == 1 and status.cancelled == 1 and status.served == 1


async def test_a_stalled_client_learns_that_its_request_was_cancelled(deploy, reference, tiny_verify):
    """A client whose event loop blocks past the liveness window sends no pings, so its request is cancelled; once
    it runs again it gets the committed tokens and a clear error, where it used to wait for the request forever."""
    d = deploy(AMUSD_VERIFY_DELAY_MS=10)
    await d.wait_ready(timeout_s=120)
    async with AsyncClient(d.url, timeout_s=30) as client:
        stream = client.stream(PROMPT, max_new_tokens=2000, ignore_eos=True)
        got = list((await stream.__anext__()).token_ids)
        time.sleep(WINDOW_S + 1.0)  # blocks the event loop: no pings go out
        with pytest.raises(RequestFailedError) as err:
            async for chunk in stream:
                got += chunk.token_ids
        status = await client.status()
    assert err.value.code == "client_lost" and status.clients_lost == 1 and status.cancelled == 1
    committed = err.value.token_ids
    assert got == committed[:len(got)] and committed == expected(tiny_verify, reference, PROMPT, len(committed))


@pytest.mark.parametrize("how", ["close", "break", "drop", "leave"])
async def test_a_closed_or_abandoned_stream_cancels_its_request(deploy, reference, tiny_verify, how):
    d = deploy(AMUSD_VERIFY_DELAY_MS=10, AMUSD_MAX_BATCH=1)  # one at a time: the next waits until it is freed
    await d.wait_ready(timeout_s=120)
    client = AsyncClient(d.url, timeout_s=30)
    await client.connect()
    long = dict(max_new_tokens=2000, ignore_eos=True)
    if how == "close":
        running = await first_chunk(client.stream(PROMPT, **long))
        await client.close()
        with pytest.raises(ClientClosedError, match="closed"):  # it was a raw zmq.ZMQError
            await running
        with pytest.raises(ClientClosedError):
            await client.generate(PROMPT, max_new_tokens=4)
    elif how == "break":
        async for _ in client.stream(PROMPT, **long):
            break
    elif how == "leave":
        async with client.stream(PROMPT, **long) as stream:
            async for _ in stream:
                break
    else:
        stream = client.stream(PROMPT, **long)
        await stream.__anext__()
        del stream  # the only reference: collected, which closes it
        gc.collect()
    async with AsyncClient(d.url, timeout_s=30) as other:
        r = await other.generate("Hello, world", max_new_tokens=8)
        status = await other.status()
    await client.close()
    assert r.token_ids == expected(tiny_verify, reference, "Hello, world", 8)
    assert r.stats["queue_s"] < 0.5  # freed by the cancel, not by the liveness window
    assert status.cancelled == 1 and status.served == 1 and status.clients_lost == 0


async def test_one_clients_flood_does_not_starve_another(deploy, reference, tiny_verify):
    d = deploy(AMUSD_VERIFY_DELAY_MS=10, AMUSD_MAX_CLIENT_REQUESTS=50)
    await d.wait_ready(timeout_s=120)
    async with AsyncClient(d.url, timeout_s=60) as flood, AsyncClient(d.url, timeout_s=30) as polite:
        floods = [asyncio.create_task(flood.generate(prompt_ids=[1, 2, 3], max_new_tokens=40, ignore_eos=True))
                  for _ in range(1000)]
        await asyncio.wait(floods, timeout=1.0)  # all sent; the refusals are back
        r = await polite.generate(PROMPT, max_new_tokens=60, deadline_s=15)
        refused = [t for t in floods if t.done() and isinstance(t.exception(), OverloadedError)]
        assert len(refused) >= 900  # 50 in flight at once; a few more as the first ones finish
        assert "AMUSD_MAX_CLIENT_REQUESTS" in str(refused[0].exception())
        assert r.token_ids == expected(tiny_verify, reference, PROMPT, 60)
        assert r.stats["queue_s"] < 2.0  # behind at most the one running: 40 tokens
        for t in floods:
            t.cancel()
        await asyncio.gather(*floods, return_exceptions=True)


async def test_the_queue_is_bounded(deploy, reference, tiny_verify):
    d = deploy(AMUSD_VERIFY_DELAY_MS=10, AMUSD_MAX_QUEUE=3, AMUSD_MAX_BATCH=1)
    await d.wait_ready(timeout_s=120)
    prompts = [[5, 6, 7 + i] for i in range(8)]
    async with AsyncClient(d.url, timeout_s=60) as client:
        results = await asyncio.gather(*(client.generate(prompt_ids=q, max_new_tokens=40) for q in prompts),
                                       return_exceptions=True)
    refused = [r for r in results if isinstance(r, OverloadedError)]
    assert len(refused) == 4 and all("AMUSD_MAX_QUEUE" in str(e) for e in refused)  # one running, three waiting
    for q, r in zip(prompts, results):
        if not isinstance(r, Exception):
            assert r.token_ids == reference(q, 40)


async def test_a_subnormal_temperature_is_refused_and_served_counts_only_finished_requests(deploy):
    d = deploy(roles=("coordinator", "verify"))
    await d.wait_ready(drafts=0, timeout_s=120)
    with pytest.raises(InvalidRequestError, match="temperature"):
        async with AsyncClient(d.url, timeout_s=30) as client:
            await client.generate(PROMPT, max_new_tokens=8, temperature=5e-324)
    raw = {"v": V, "t": "generate", "req_id": "r", "max_new_tokens": 8, "prompt": PROMPT, "temperature": 5e-324}
    replies = await raw_exchange(d.url, [[msgpack.packb({**raw, "sampling_mode": mode})]
                                         for mode in ("seeded", "exact")])
    assert [(r.code, "temperature" in r.message) for r in replies] == [("invalid_request", True)] * 2
    async with AsyncClient(d.url, timeout_s=30) as client:
        stream = client.stream(PROMPT, max_new_tokens=500, ignore_eos=True)
        await stream.__anext__()
        await stream.aclose()
        await client.generate(PROMPT, max_new_tokens=4)
        status = await client.status()
    assert (status.served, status.cancelled) == (1, 1)
