"""Many requests on one worker pair: one batched pass serves them all, each exactly as if it ran alone."""
import asyncio

import pytest
from conftest import PROMPTS

from amusd_mq import AsyncClient

pytestmark = pytest.mark.asyncio
MAX_NEW = 32


async def test_sixteen_at_once_share_passes_and_each_is_its_own_solo_output(deploy, reference, tiny_verify):
    d = deploy(AMUSD_VERIFY_DELAY_MS=10)
    await d.wait_ready(timeout_s=120)
    async with AsyncClient(d.url, timeout_s=60) as client:
        results = await asyncio.gather(*(client.generate(q, max_new_tokens=MAX_NEW) for q in PROMPTS[:16]))
    for prompt, r in zip(PROMPTS, results):
        assert r.token_ids == reference(tiny_verify.tokenizer(prompt)["input_ids"], MAX_NEW), prompt
    assert max(r.stats["verify_batch"] for r in results) > 8  # they really shared passes
    assert sum(r.stats["accepted"] for r in results) > 0  # and speculated while batched


async def test_a_worker_serves_at_most_its_capacity_and_the_rest_wait(deploy, reference, tiny_verify):
    d = deploy(AMUSD_VERIFY_DELAY_MS=20, AMUSD_MAX_BATCH=2)
    await d.wait_ready(timeout_s=120)
    async with AsyncClient(d.url, timeout_s=60) as client:
        running = asyncio.gather(*(client.generate(q, max_new_tokens=MAX_NEW) for q in PROMPTS[:6]))
        seen = []
        while not running.done():
            seen.append(await client.status())
            await asyncio.sleep(0.05)
        results = await running
    for prompt, r in zip(PROMPTS, results):
        assert r.token_ids == reference(tiny_verify.tokenizer(prompt)["input_ids"], MAX_NEW), prompt
        assert r.stats["verify_batch"] <= 2
    assert max(s.active for s in seen) == 2 and max(s.queued for s in seen) >= 2
