"""A forward pass that raises, through real processes. Before, the worker dropped its whole batch and the coordinator
sent it back again and again: one request that broke the pass blocked the others forever, and no client was told.
Now the failed pass runs again in halves until the request that breaks it is found: that one fails, with what it
committed, and the others go on; a worker whose every pass fails reports itself unhealthy."""
import asyncio
import socket
import time
import urllib.error
import urllib.request

import pytest
from conftest import PROMPTS

from amusd_mq import AsyncClient, NoWorkerError, RequestFailedError
from amusd_mq.workers.step import PROBE

pytestmark = pytest.mark.asyncio
MAX_NEW = 24


def poisoned_case(tiny_verify, reference):
    """Seven prompts and their greedy outputs, and an eighth whose output holds, after a few tokens, a token that
    none of the seven (nor the worker's probe) holds: the token AMUSD_FAIL_TOKEN makes every pass fail on."""
    prompts = [tiny_verify.tokenizer(q)["input_ids"] for q in PROMPTS[:7]]
    outputs = [reference(ids, MAX_NEW) for ids in prompts]
    used = {t for ids, out in zip(prompts, outputs) for t in ids + out} | set(PROBE)
    for candidate in PROMPTS[7:]:
        ids = tiny_verify.tokenizer(candidate)["input_ids"]
        out = reference(ids, MAX_NEW)
        for k in range(2, MAX_NEW - 4):
            if out[k] not in used and out[k] not in ids + out[:k]:
                return prompts, outputs, ids, out, out[k]
    raise AssertionError("no prompt of PROMPTS has a token of its own")


async def test_a_request_that_breaks_its_pass_fails_alone_and_its_batch_goes_on(deploy, tiny_verify, reference):
    prompts, outputs, bad_ids, bad_out, poison = poisoned_case(tiny_verify, reference)
    d = deploy(AMUSD_FAIL_TOKEN=poison, AMUSD_MAX_BATCH=8, AMUSD_VERIFY_DELAY_MS=20)
    await d.wait_ready(timeout_s=120)
    async with AsyncClient(d.url, timeout_s=30) as client:
        others = [asyncio.create_task(client.generate(prompt_ids=ids, max_new_tokens=MAX_NEW)) for ids in prompts]
        start = time.monotonic()
        with pytest.raises(RequestFailedError) as failed:
            await client.generate(prompt_ids=bad_ids, max_new_tokens=MAX_NEW)
        took = time.monotonic() - start
        results = await asyncio.gather(*others)
        after = await client.generate(prompt_ids=prompts[0], max_new_tokens=MAX_NEW)  # the worker serves on
        status = await client.status()
    assert failed.value.code == "internal" and "forward pass failed" in str(failed.value), failed.value
    committed = failed.value.token_ids
    assert poison in committed and committed == bad_out[:len(committed)]  # what it committed, all of it correct
    assert took < 5, took
    assert [r.token_ids for r in results] == outputs
    assert after.token_ids == outputs[0]
    assert status.failed == {"internal": 1} and status.unhealthy == 0 and status.verifiers == 1


def health(port: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


async def test_a_worker_whose_every_pass_fails_reports_itself_unhealthy(deploy):
    poison = PROBE[0]  # its probe passes fail too: it stays unhealthy
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    d = deploy(roles=("coordinator", "verify"), AMUSD_FAIL_TOKEN=poison, AMUSD_QUEUE_TIMEOUT_S=1)
    d.start("gateway", AMUSD_HTTP_PORT=str(port))
    await d.wait_ready(drafts=0, timeout_s=120)
    async with AsyncClient(d.url, timeout_s=30) as client:
        for i in range(3):
            with pytest.raises(RequestFailedError, match="forward pass failed"):
                await client.generate(prompt_ids=[poison, 30 + i], max_new_tokens=4)
        async with asyncio.timeout(5):
            while (status := await client.status()).unhealthy != 1:
                await asyncio.sleep(0.05)
        assert status.verifiers == 0
        with pytest.raises(NoWorkerError):  # held for a healthy verifier, in vain
            await client.generate(prompt_ids=[40, 41], max_new_tokens=4)
    code, body = await asyncio.to_thread(health, port)
    assert code == 503 and '"unhealthy":1' in body.replace(" ", "")
    assert "reporting this worker unhealthy" in d.log_tail("verify", 200)


async def test_an_unhealthy_worker_whose_probe_goes_through_serves_again(deploy, tiny_verify, reference):
    prompts, outputs, _, _, poison = poisoned_case(tiny_verify, reference)
    d = deploy(roles=("coordinator", "verify"), AMUSD_FAIL_TOKEN=poison)
    await d.wait_ready(drafts=0, timeout_s=120)
    async with AsyncClient(d.url, timeout_s=30) as client:
        for i in range(3):
            with pytest.raises(RequestFailedError):
                await client.generate(prompt_ids=[poison, 30 + i], max_new_tokens=4)
        result = await client.generate(prompt_ids=prompts[0], max_new_tokens=MAX_NEW)  # waits for the probe
    assert result.token_ids == outputs[0]
    log = d.log_tail("verify", 200)
    assert "reporting this worker unhealthy" in log and "healthy again" in log
