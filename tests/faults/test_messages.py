"""Messages between services dropped, duplicated, delayed and reordered: the output is unchanged.

Every service sends through the faulty sockets of wire.faults here (AMUSD_FAULT_*). Epochs, positions and the PUB
stream's sequence numbers detect each loss; a snapshot, a rollback point or a resent request repairs it.
"""
import ast
import re
import time

import pytest
from conftest import PROMPTS

from amusd_mq import AsyncClient

pytestmark = pytest.mark.asyncio
MAX_NEW = 40
TIMEOUT_S = 1.5  # AMUSD_PROGRESS_TIMEOUT_S: how long a lost Assign can stall a request


async def test_output_survives_dropped_duplicated_and_delayed_messages(deploy, reference, tiny_verify):
    d = deploy(AMUSD_FAULT_DROP=0.05, AMUSD_FAULT_DUP=0.05, AMUSD_FAULT_DELAY=0.1, AMUSD_FAULT_DELAY_MS=20,
               AMUSD_PROGRESS_TIMEOUT_S=TIMEOUT_S, AMUSD_LIVENESS=20, AMUSD_VERIFY_DELAY_MS=5)
    await d.wait_ready(timeout_s=120)
    prompts = PROMPTS[:12]

    async def one(client, prompt):
        start = time.monotonic()
        ids = (await client.generate(prompt, max_new_tokens=MAX_NEW, ignore_eos=True)).token_ids
        return ids, time.monotonic() - start

    async with AsyncClient(d.url, timeout_s=30) as client:
        results = [await one(client, prompt) for prompt in prompts]
    for prompt, (ids, _) in zip(prompts, results):
        assert ids == reference(tiny_verify.tokenizer(prompt)["input_ids"], MAX_NEW), prompt
    # A lost Assign costs a progress timeout; the resent one can be lost too, but rarely twice.
    assert max(elapsed for _, elapsed in results) < 3 * TIMEOUT_S + 2
    d.stop()
    injected = {}
    for name in ("coordinator", "draft", "verify"):
        found = re.findall(r"message faults injected: (\{.*\})", (d.log_dir / f"{name}.log").read_text())
        for kind, n in ast.literal_eval(found[-1]).items():
            injected[kind] = injected.get(kind, 0) + n
    assert min(injected.get(k, 0) for k in ("dropped", "duplicated", "delayed")) >= 5, injected
