"""A draft killed or frozen mid-generation costs speed, never correctness; a spare draft joins late."""
import signal
import time

import pytest
from test_verifier_loss import DETECT_S, MAX_NEW, PROMPT, first_chunk_then

from amusd_mq import AsyncClient
from amusd_mq.bench.baselines import autoregressive

pytestmark = pytest.mark.asyncio


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP])
async def test_verifier_carries_on_when_the_draft_goes(deploy, reference, tiny_verify, sig):
    d = deploy(AMUSD_VERIFY_DELAY_MS=20)
    await d.wait_ready(timeout_s=120)
    draft = d.procs["draft"]
    try:
        async with AsyncClient(d.url, timeout_s=30) as client:
            stream = client.stream(PROMPT, max_new_tokens=MAX_NEW)
            ids, times = await first_chunk_then(stream, lambda: draft.send_signal(sig))
        assert ids == reference(tiny_verify.tokenizer(PROMPT)["input_ids"], MAX_NEW)
        assert max(b - a for a, b in zip(times, times[1:])) < 0.5  # the verifier never waited for it
    finally:
        if sig == signal.SIGSTOP:
            draft.send_signal(signal.SIGCONT)


async def test_spare_draft_joins_a_running_request(deploy, reference, tiny_verify):
    d = deploy(AMUSD_VERIFY_DELAY_MS=30)
    await d.wait_ready(timeout_s=120)
    d.start("draft", name="spare")
    await d.wait_ready(drafts=2, timeout_s=120)
    ids, late_chunks = [], []
    async with AsyncClient(d.url, timeout_s=30) as client:
        async for chunk in client.stream(PROMPT, max_new_tokens=200, ignore_eos=True):
            if not ids:
                d.procs["draft"].kill()
                killed = time.monotonic()
            elif time.monotonic() - killed > DETECT_S + 0.5:
                late_chunks.append(len(chunk.token_ids))
            ids += chunk.token_ids
    assert ids == autoregressive(tiny_verify, tiny_verify.tokenizer(PROMPT)["input_ids"], 200, []).token_ids
    assert max(late_chunks) > 1  # accepted proposals after the first draft was gone: the spare's
