"""The coordinator killed mid-generation: clients get a clear error in time, workers come back when it does."""
import time

import pytest
from test_verifier_loss import MAX_NEW, PROMPT, first_chunk_then

from amusd_mq import AsyncClient, CoordinatorUnavailableError

pytestmark = pytest.mark.asyncio


async def test_clients_fail_fast_and_workers_re_register(deploy, reference, tiny_verify):
    d = deploy(AMUSD_VERIFY_DELAY_MS=40)
    await d.wait_ready(timeout_s=120)
    expected = reference(tiny_verify.tokenizer(PROMPT)["input_ids"], MAX_NEW)
    async with AsyncClient(d.url, timeout_s=2.0) as client:
        stream = client.stream(PROMPT, max_new_tokens=MAX_NEW)
        start = time.monotonic()
        with pytest.raises(CoordinatorUnavailableError, match="silent"):
            await first_chunk_then(stream, lambda: d.procs["coordinator"].kill())
        assert time.monotonic() - start < 2.0 + 1.5
    assert stream.result.token_ids == expected[:len(stream.result.token_ids)]  # what arrived was right
    d.procs.pop("coordinator").wait()  # killed on purpose: no longer watched
    d.start("coordinator", name="coordinator2")
    await d.wait_ready(timeout_s=60)  # both workers registered again on their own
    async with AsyncClient(d.url, timeout_s=30) as client:
        again = await client.generate(PROMPT, max_new_tokens=MAX_NEW)
    assert again.token_ids == expected


async def test_a_restarted_coordinator_fails_lost_requests_at_once_and_a_resubmission_matches(
        deploy, reference, tiny_verify):
    d = deploy(AMUSD_VERIFY_DELAY_MS=40)
    await d.wait_ready(timeout_s=120)
    expected = reference(tiny_verify.tokenizer(PROMPT)["input_ids"], MAX_NEW)

    def restart():
        d.procs.pop("coordinator").kill()
        d.start("coordinator", name="coordinator2")

    async with AsyncClient(d.url, timeout_s=8.0) as client:  # pings every 2 s; the restart answers them
        stream = client.stream(PROMPT, max_new_tokens=MAX_NEW)
        start = time.monotonic()
        with pytest.raises(CoordinatorUnavailableError, match="restarted"):
            await first_chunk_then(stream, restart)
        assert time.monotonic() - start < 8.0  # told before the silence timeout: the new one answers pings
        await d.wait_ready(timeout_s=60)
        again = await client.generate(PROMPT, max_new_tokens=MAX_NEW)  # the same client, resubmitting
    assert again.token_ids == expected
