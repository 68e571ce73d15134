"""A worker killed in the middle of a batch hands every one of its requests on, nothing lost or repeated."""
import asyncio

import pytest
from conftest import PROMPTS

from amusd_mq import AsyncClient
from amusd_mq.bench.baselines import autoregressive

pytestmark = pytest.mark.asyncio
MAX_NEW = 60


async def streams_with_a_kill(d, kill) -> list[list[int]]:
    """Eight concurrent streams; `kill` runs once every stream has its first tokens."""
    started = asyncio.Event()
    firsts = []

    async def one(client, prompt):
        ids = []
        async for chunk in client.stream(prompt, max_new_tokens=MAX_NEW, ignore_eos=True):
            if not ids:
                firsts.append(prompt)
                if len(firsts) == 8:
                    started.set()
            ids += chunk.token_ids
        return ids

    async with AsyncClient(d.url, timeout_s=60) as client:
        running = asyncio.gather(*(one(client, q) for q in PROMPTS[:8]))
        await started.wait()
        kill()
        return await running


@pytest.mark.parametrize("role", ["verify", "draft"])
async def test_a_worker_killed_mid_batch_hands_on_all_its_requests(deploy, tiny_verify, role):
    d = deploy(AMUSD_VERIFY_DELAY_MS=30)
    await d.wait_ready(timeout_s=120)
    d.start(role, name="spare")
    await d.wait_ready(verifiers=1 + (role == "verify"), drafts=1 + (role == "draft"), timeout_s=120)
    outputs = await streams_with_a_kill(d, lambda: d.procs[role].kill())
    for prompt, ids in zip(PROMPTS, outputs):
        prompt_ids = tiny_verify.tokenizer(prompt)["input_ids"]
        assert ids == autoregressive(tiny_verify, prompt_ids, MAX_NEW, []).token_ids, prompt
    async with AsyncClient(d.url, timeout_s=30) as client:
        status = await client.status()
    assert status.served == 8 and status.active == 0
