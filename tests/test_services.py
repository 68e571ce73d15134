"""End to end: coordinator, verify and draft as separate processes on real sockets, tiny fp32 models."""
import asyncio
import os
import signal
import socket
import time

import msgpack
import pytest
import zmq
import zmq.asyncio
from conftest import PROMPTS, kernel_paths, raw_exchange

from amusd_mq import AsyncClient, CoordinatorUnavailableError, InvalidRequestError, NoWorkerError
from amusd_mq.bench.baselines import autoregressive
from amusd_mq.runtime.load import load
from amusd_mq.sampling import Sampling
from amusd_mq.wire import protocol as p

pytestmark = pytest.mark.asyncio
MAX_NEW = 24
LOOKAHEADS = (1, 3, 8)
SPEEDS = {  # tiny-model steps take ~1 ms; injected delays set the draft/verify speed ratio
    "draft_much_faster": {"AMUSD_VERIFY_DELAY_MS": 20},
    "draft_as_fast": {"AMUSD_VERIFY_DELAY_MS": 8, "AMUSD_DRAFT_DELAY_MS": 8},
    "draft_much_slower": {"AMUSD_VERIFY_DELAY_MS": 2, "AMUSD_DRAFT_DELAY_MS": 25},
    "draft_always_wrong": {"AMUSD_VERIFY_DELAY_MS": 8, "AMUSD_DRAFT_WRONG": "true"},
}


@pytest.mark.parametrize("speed", SPEEDS)
async def test_greedy_output_is_the_verify_models_own(deploy, reference, tiny_verify, speed):
    d = deploy(**SPEEDS[speed])
    await d.wait_ready(timeout_s=120)
    cases = [(prompt, la) for prompt in PROMPTS for la in LOOKAHEADS]
    async with AsyncClient(d.url, timeout_s=30) as client:
        results = await asyncio.gather(*(client.generate(prompt, max_new_tokens=MAX_NEW, lookahead=la)
                                         for prompt, la in cases))
    for (prompt, la), r in zip(cases, results):
        ids = tiny_verify.tokenizer(prompt)["input_ids"]
        assert r.prompt_ids == ids
        assert r.token_ids == reference(ids, MAX_NEW), (prompt, la)
        assert r.finish_reason == ("stop" if r.token_ids[-1] in tiny_verify.eos_token_ids else "length")
        assert r.stats["new_tokens"] == len(r.token_ids)
    proposed = sum(r.stats["proposed"] for r in results)
    accepted = sum(r.stats["accepted"] for r in results)
    tokens = sum(r.stats["new_tokens"] for r in results)
    steps = sum(r.stats["verify_steps"] for r in results)
    if speed == "draft_much_faster":  # speculation really happened
        assert accepted / proposed > 0.3 and tokens / steps > 1.3
    if speed == "draft_always_wrong":
        assert accepted / max(proposed, 1) < 0.1


SAMPLED = [(seed, temperature, la) for seed in (1, 2) for temperature in (0.7, 1.3) for la in (1, 4)]


async def test_seeded_output_is_the_verify_models_own_seeded_sample(deploy, tiny_verify):
    d = deploy(AMUSD_VERIFY_DELAY_MS=10)
    await d.wait_ready(timeout_s=120)
    cases = [(prompt, *case) for prompt in PROMPTS[:20] for case in SAMPLED]
    async with AsyncClient(d.url, timeout_s=60) as client:
        results = await asyncio.gather(*(
            client.generate(prompt, max_new_tokens=MAX_NEW, lookahead=la, temperature=t, top_p=0.95, seed=seed,
                            sampling_mode="seeded") for prompt, seed, t, la in cases))
    outputs = {}
    for (prompt, seed, t, la), r in zip(cases, results):
        alone = autoregressive(tiny_verify, r.prompt_ids, MAX_NEW, tiny_verify.eos_token_ids,
                               Sampling("seeded", t, top_p=0.95, seed=seed)).token_ids
        assert r.token_ids == alone, (prompt, seed, t, la)
        assert r.stats["seed"] == seed
        outputs[prompt, seed, t] = r.token_ids
    differs = [outputs[prompt, 1, t] != outputs[prompt, 2, t] for prompt in PROMPTS[:20] for t in (0.7, 1.3)]
    assert sum(differs) > 0.8 * len(differs)  # another seed, another sample
    assert sum(r.stats["accepted"] for r in results) > 0.3 * sum(r.stats["proposed"] for r in results)


async def test_exact_mode_samples_through_the_services(deploy, tiny_verify):
    d = deploy(AMUSD_VERIFY_DELAY_MS=10)
    await d.wait_ready(timeout_s=120)
    async with AsyncClient(d.url, timeout_s=60) as client:
        results = await asyncio.gather(*(client.generate(prompt, max_new_tokens=MAX_NEW, temperature=0.8, top_k=20,
                                                         seed=i) for i, prompt in enumerate(PROMPTS[:8])))
        with pytest.raises(InvalidRequestError, match="top_p"):
            await client.generate("x", max_new_tokens=4, temperature=0.8, top_p=1.5)
        with pytest.raises(InvalidRequestError, match="temperature"):
            await client.generate("x", max_new_tokens=4, temperature=-0.1)
    assert all(len(r.token_ids) == MAX_NEW or r.finish_reason == "stop" for r in results)
    # Distributions travelled with the proposals (a malformed one would be refused and accept nothing).
    assert sum(r.stats["accepted"] for r in results) > 0.2 * sum(r.stats["proposed"] for r in results) > 0
    # The exact distribution itself is tested in tests/test_sampling.py, through the same verify and propose.


async def test_stream_delivers_each_committed_token_once_in_order(deploy, reference, tiny_verify):
    d = deploy(AMUSD_VERIFY_DELAY_MS=10)
    await d.wait_ready(timeout_s=120)
    async with AsyncClient(d.url, timeout_s=30) as client:
        stream = client.stream("def fib(n):", max_new_tokens=40)
        chunks = [chunk async for chunk in stream]
    ids = tiny_verify.tokenizer("def fib(n):")["input_ids"]
    assert [t for c in chunks for t in c.token_ids] == reference(ids, 40) == stream.result.token_ids
    assert len(chunks) > 1 and all(c.token_ids for c in chunks)
    assert "".join(c.text for c in chunks) == tiny_verify.tokenizer.decode(stream.result.token_ids,
                                                                           skip_special_tokens=True)


async def test_concurrent_clients_are_queued_never_mixed(deploy, reference, tiny_verify):
    d = deploy(AMUSD_VERIFY_DELAY_MS=3)
    await d.wait_ready(timeout_s=120)

    async def one_client(prompts):
        async with AsyncClient(d.url, timeout_s=30) as client:
            return await asyncio.gather(*(client.generate(q, max_new_tokens=16) for q in prompts))

    groups = [PROMPTS[i::4] for i in range(4)]
    results = await asyncio.gather(*(one_client(g) for g in groups))
    for prompts, rs in zip(groups, results):
        for prompt, r in zip(prompts, rs):
            assert r.token_ids == reference(tiny_verify.tokenizer(prompt)["input_ids"], 16)
    async with AsyncClient(d.url, timeout_s=30) as client:
        status = await client.status()
    assert status.served == len(PROMPTS) and status.queued == 0 and status.active == 0


async def test_bad_requests_get_clear_errors(deploy):
    d = deploy(roles=("coordinator", "verify"))
    await d.wait_ready(drafts=0, timeout_s=120)
    async with AsyncClient(d.url, timeout_s=30) as client:
        bad = [
            dict(prompt="", max_new_tokens=4), dict(prompt="x", max_new_tokens=-1), dict(prompt="x", max_new_tokens=0),
            dict(prompt="x", max_new_tokens=10**30), dict(prompt="x", prompt_ids=[1], max_new_tokens=4),
            dict(prompt_ids=[], max_new_tokens=4), dict(prompt_ids=[-3], max_new_tokens=4),
            dict(prompt="x", max_new_tokens="4"), dict(prompt="x", max_new_tokens=4, lookahead=0),
        ]
        for kwargs in bad:  # refused before anything is sent
            with pytest.raises(InvalidRequestError):
                await client.generate(**kwargs)
        refused = {  # refused by the coordinator, which knows the model
            "vocabulary": dict(prompt_ids=[1, 999_999], max_new_tokens=4),
            "context": dict(prompt_ids=[1] * 2049, max_new_tokens=4),
            "exceeds": dict(prompt="x", max_new_tokens=10**9),
            "lookahead": dict(prompt="x", max_new_tokens=4, lookahead=1000),
        }
        for words, kwargs in refused.items():
            with pytest.raises(InvalidRequestError, match=words):
                await client.generate(**kwargs)
        assert (await client.generate(prompt_ids=[1, 2], max_new_tokens=3)).finish_reason in ("length", "stop")


async def test_malformed_messages_are_rejected_counted_and_survived(deploy, reference, tiny_verify):
    d = deploy(AMUSD_MAX_MESSAGE_BYTES=100_000, AMUSD_MAX_CONTEXT=2048)
    await d.wait_ready(timeout_s=120)
    body = {"v": p.PROTOCOL_VERSION}
    frames = {
        "malformed": [b"\xc1\xc1 not msgpack"],
        "version": [msgpack.packb({"v": 999, "t": "hello"})],
        "unknown_type": [msgpack.packb({**body, "t": "format_disk"})],
        "field": [msgpack.packb({**body, "t": "generate", "req_id": 7, "max_new_tokens": 1})],
        "oversized": [b"\x00" * 100_001],
        "unexpected_type": [p.encode(p.Commit(seq=1, req_id="x", epoch=0, start=0, token_ids=[], done=False,
                                              lookahead=1))],
        "unknown_worker": [p.encode(p.Verdict(req_id="x", start=0, token_ids=[1], proposed=0, accepted=0, epoch=0,
                                              lookahead=1))],
    }
    frames["malformed"].append(b"")  # a second, multipart payload
    replies = await raw_exchange(d.url, list(frames.values()))
    assert [r.code for r in replies] == list(frames)
    assert all(isinstance(r, p.Error) and r.message for r in replies)
    async with AsyncClient(d.url, timeout_s=30) as client:
        result = await client.generate("still serving?", max_new_tokens=12)
        status = await client.status()
    assert result.token_ids == reference(tiny_verify.tokenizer("still serving?")["input_ids"], 12)
    for kind in frames:
        assert status.rejected[kind] >= 1


async def test_flood_of_garbage_does_not_stop_service(deploy, reference, tiny_verify):
    d = deploy(AMUSD_VERIFY_DELAY_MS=5)
    await d.wait_ready(timeout_s=120)
    ctx = zmq.asyncio.Context()
    spam = ctx.socket(zmq.DEALER)
    spam.linger = 0
    spam.connect(d.url)
    async def flood():
        for i in range(3000):
            await spam.send(os.urandom(i % 64 + 1))
            if i % 100 == 0:
                await asyncio.sleep(0)
    async with AsyncClient(d.url, timeout_s=30) as client:
        _, result = await asyncio.gather(flood(), client.generate("Hello, world", max_new_tokens=20))
        status = await client.status()
    spam.close()
    ctx.term()
    assert result.token_ids == reference(tiny_verify.tokenizer("Hello, world")["input_ids"], 20)
    assert sum(status.rejected.values()) >= 1000


async def test_no_worker_and_no_coordinator_are_typed_errors(deploy, tmp_path):
    with pytest.raises(CoordinatorUnavailableError, match="no answer"):
        async with AsyncClient(f"ipc://{tmp_path}/nobody", timeout_s=0.5):
            pass
    with pytest.raises(CoordinatorUnavailableError, match="can't connect"):
        async with AsyncClient("tcp://no port here", timeout_s=0.5):
            pass
    d = deploy(roles=("coordinator",), AMUSD_QUEUE_TIMEOUT_S=0.5)
    await d.wait_ready(verifiers=0, drafts=0, timeout_s=60)
    async with AsyncClient(d.url, timeout_s=5) as client:
        start = time.monotonic()
        with pytest.raises(NoWorkerError, match="within 0.5s"):
            await client.generate("x", max_new_tokens=3)
        assert time.monotonic() - start < 3  # within a heartbeat of the queue timeout
        with pytest.raises(NoWorkerError):
            await client.wait_ready(0.3)
        assert (await client.status()).queued == 0


async def test_a_request_sent_before_any_verifier_waits_for_one(deploy, reference, tiny_verify):
    d = deploy(roles=("coordinator",))
    await d.wait_ready(verifiers=0, drafts=0, timeout_s=60)
    async with AsyncClient(d.url, timeout_s=30) as client:
        early = asyncio.create_task(client.generate("Once upon a time", max_new_tokens=12))
        await asyncio.sleep(0.5)
        assert (await client.status()).queued == 1 and not early.done()
        d.start("verify")
        d.start("draft")
        status = await client.wait_ready(120)
        assert status.verifiers == 1
        r = await asyncio.wait_for(early, 60)
    assert r.token_ids == reference(tiny_verify.tokenizer("Once upon a time")["input_ids"], 12)


@pytest.mark.parametrize("runner", ["native", "hf"])
async def test_verifier_alone_serves_without_a_draft_on_either_runner(deploy, reference, tiny_verify, runner):
    d = deploy(roles=("coordinator", "verify"), AMUSD_RUNNER=runner)
    await d.wait_ready(drafts=0, timeout_s=120)
    async with AsyncClient(d.url, timeout_s=30) as client:
        r = await client.generate("for i in range(10):", max_new_tokens=20)
    assert r.token_ids == reference(tiny_verify.tokenizer("for i in range(10):")["input_ids"], 20)
    assert r.stats["proposed"] == 0 and r.stats["verify_steps"] == len(r.token_ids)
    assert r.stats["runner"] == runner and f"{runner} runner" in d.log_tail("verify")


async def test_a_quantized_draft_keeps_the_output_and_a_quantized_verifier_serves_its_own(deploy, reference, tiny_cache,
                                                                                           tiny_verify):
    d = deploy(AMUSD_DRAFT_QUANT="int8", **SPEEDS["draft_much_faster"])
    await d.wait_ready(timeout_s=120)
    ids = tiny_verify.tokenizer("Once upon a time")["input_ids"]
    async with AsyncClient(d.url, timeout_s=30) as client:
        r = await client.generate(prompt_ids=ids, max_new_tokens=24)
    assert r.token_ids == reference(ids, 24) and r.stats["accepted"] > 0
    d.stop()
    quantized = load("tiny-verify", "cpu", "float32", tiny_cache, quant="int4")
    d = deploy(AMUSD_DRAFT_QUANT="int8", AMUSD_VERIFY_QUANT="int4", **SPEEDS["draft_much_faster"])
    await d.wait_ready(timeout_s=120)
    async with AsyncClient(d.url, timeout_s=30) as client:
        r = await client.generate(prompt_ids=ids, max_new_tokens=24)
    assert r.token_ids == autoregressive(quantized, ids, 24, quantized.eos_token_ids).token_ids
    assert r.token_ids != reference(ids, 24)[:len(r.token_ids)]  # so the test tells the two models apart
    assert kernel_paths(r.stats["kernels"]) == {"int4"}


async def test_stop_token_ids(deploy, reference, tiny_verify):
    d = deploy()
    await d.wait_ready(timeout_s=120)
    ids = tiny_verify.tokenizer("Once upon a time")["input_ids"]
    ref = reference(ids, 20)
    async with AsyncClient(d.url, timeout_s=30) as client:
        r = await client.generate(prompt_ids=ids, max_new_tokens=20, stop_token_ids=[ref[5]])
    first = ref.index(ref[5])
    assert r.token_ids == ref[:first + 1] and r.finish_reason == "stop"


async def test_ignore_eos_decodes_past_the_end_of_text(deploy, tiny_verify):
    from amusd_mq.bench.baselines import autoregressive

    def greedy(prompt_ids, n, stop):
        return autoregressive(tiny_verify, prompt_ids, n, stop).token_ids

    eos = tiny_verify.eos_token_ids
    ids = next(q for q in ([i, j] for i in range(40) for j in range(40)) if greedy(q, 40, eos)[-1] in eos)
    plain = greedy(ids, 40, eos)
    d = deploy()
    await d.wait_ready(timeout_s=120)
    async with AsyncClient(d.url, timeout_s=30) as client:
        stopped = await client.generate(prompt_ids=ids, max_new_tokens=40)
        ignored = await client.generate(prompt_ids=ids, max_new_tokens=len(plain) + 10, ignore_eos=True)
    assert stopped.token_ids == plain and stopped.finish_reason == "stop"
    assert ignored.token_ids == greedy(ids, len(plain) + 10, []) and len(ignored.token_ids) > len(plain)


async def test_vocabulary_mismatch_is_refused(deploy, odd_draft):
    d = deploy(roles=("coordinator", "verify"))
    await d.wait_ready(drafts=0, timeout_s=120)
    draft = d.start("draft", AMUSD_DRAFT_MODEL=odd_draft)
    assert draft.wait(60) == 2
    assert "different vocabulary" in d.log_tail("draft")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_signals_stop_every_service_within_5s(deploy, sig):
    d = deploy(AMUSD_VERIFY_DELAY_MS=50, AMUSD_DRAFT_DELAY_MS=20)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        d.start("gateway", AMUSD_HTTP_PORT=str(s.getsockname()[1]))
    await d.wait_ready(timeout_s=120)
    async with AsyncClient(d.url, timeout_s=30) as client:
        gen = asyncio.create_task(client.generate("def fib(n):", max_new_tokens=200))
        await asyncio.sleep(1.0)  # mid-generation: forward passes are running
        for name in ("gateway", "draft", "verify", "coordinator"):
            proc = d.procs[name]
            start = time.monotonic()
            proc.send_signal(sig)
            code = await asyncio.to_thread(proc.wait, 5)
            assert time.monotonic() - start < 5 and code == 0, d.log_tail(name)
        with pytest.raises(Exception):
            await gen


async def test_workers_are_held_to_their_role_and_their_requests(deploy, tiny_verify):
    d = deploy(roles=("coordinator", "verify"))
    await d.wait_ready(drafts=0, timeout_s=120)
    sign_up = dict(model="imposter", runner="hf", kernels="aten", vocab_size=tiny_verify.vocab_size,
                   vocab_hash=tiny_verify.info.vocab_hash, max_context=64, eos_token_ids=[], max_batch=1)
    replies = await raw_exchange(d.url, [
        [p.encode(p.Register(role="judge", **sign_up))],
        [p.encode(p.Register(role="draft", **{**sign_up, "vocab_hash": "0" * 64}))],
        [p.encode(p.Register(role="draft", **sign_up))],
        [p.encode(p.Verdict(req_id="x", start=0, token_ids=[1], proposed=0, accepted=0, epoch=0, lookahead=1))],
        [p.encode(p.Propose(req_id="not-mine", epoch=0, pos=0, token_ids=[1]))],
    ])
    assert [type(r).__name__ for r in replies] == ["Error", "Error", "Registered", "Error", "Release"]
    assert [r.code for r in replies if isinstance(r, p.Error)] == ["invalid_register", "vocab_mismatch", "wrong_role"]
    assert replies[-1].req_id == "not-mine"  # told to stop serving what it doesn't own
    async with AsyncClient(d.url, timeout_s=30) as client:
        status = await client.status()
    assert status.rejected["wrong_role"] == 1 and status.rejected["stale"] == 1


async def test_a_second_coordinator_refuses_an_address_in_use(deploy):
    d = deploy(roles=("coordinator",))
    await d.wait_ready(verifiers=0, drafts=0, timeout_s=60)
    second = d.start("coordinator", name="second")
    assert second.wait(timeout=30) == 2
    assert "already listening" in d.log_tail("second")
    d.procs.pop("second")
    async with AsyncClient(d.url, timeout_s=5) as client:  # the first still owns the address
        assert (await client.status()).verifiers == 0
