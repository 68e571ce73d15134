"""A verifier killed mid-generation: a spare resumes from the committed tokens, or the client gets them."""
import signal
import time

import pytest

from amusd_mq import AsyncClient, RequestFailedError

pytestmark = pytest.mark.asyncio
PROMPT, MAX_NEW = "def fib(n):", 60
DETECT_S = 0.25 * 5  # heartbeat interval x liveness in the deploy fixture


async def first_chunk_then(stream, action):
    """Consume a stream, running `action` once the first tokens are in; returns the tokens and chunk times."""
    ids, times = [], []
    async for chunk in stream:
        ids += chunk.token_ids
        times.append(time.monotonic())
        if action is not None:
            action()
            action = None
    return ids, times


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP])
async def test_spare_verifier_resumes_without_losing_or_repeating_a_token(deploy, reference, tiny_verify, sig):
    d = deploy(AMUSD_VERIFY_DELAY_MS=40)
    await d.wait_ready(timeout_s=120)
    d.start("verify", name="spare")
    await d.wait_ready(verifiers=2, timeout_s=120)
    victim = d.procs["verify"]  # registered first, so it is the one serving
    async with AsyncClient(d.url, timeout_s=30) as client:
        stream = client.stream(PROMPT, max_new_tokens=MAX_NEW)
        ids, times = await first_chunk_then(stream, lambda: victim.send_signal(sig))
    try:
        expected = reference(tiny_verify.tokenizer(PROMPT)["input_ids"], MAX_NEW)
        assert ids == expected == stream.result.token_ids  # nothing lost, nothing repeated, nothing changed
        longest_pause = max(b - a for a, b in zip(times, times[1:]))
        assert DETECT_S * 0.5 < longest_pause < DETECT_S + 3.0  # detected by heartbeats, resumed promptly
    finally:
        if sig == signal.SIGSTOP:
            victim.send_signal(signal.SIGCONT)


async def test_without_a_spare_the_client_gets_the_committed_tokens(deploy, reference, tiny_verify):
    d = deploy(AMUSD_VERIFY_DELAY_MS=40, AMUSD_FAILOVER_S=1.0)
    await d.wait_ready(timeout_s=120)
    async with AsyncClient(d.url, timeout_s=30) as client:
        stream = client.stream(PROMPT, max_new_tokens=MAX_NEW)
        start = time.monotonic()
        with pytest.raises(RequestFailedError) as err:
            await first_chunk_then(stream, lambda: d.procs["verify"].kill())
        assert time.monotonic() - start < DETECT_S + 1.0 + 3.0
    expected = reference(tiny_verify.tokenizer(PROMPT)["input_ids"], MAX_NEW)
    committed = err.value.token_ids
    assert err.value.code == "worker_lost" and 0 < len(committed) < MAX_NEW
    assert committed == expected[:len(committed)] == stream.result.token_ids


async def test_a_late_verifier_picks_up_an_orphaned_request(deploy, reference, tiny_verify):
    d = deploy(AMUSD_VERIFY_DELAY_MS=40, AMUSD_FAILOVER_S=30)
    await d.wait_ready(timeout_s=120)
    async with AsyncClient(d.url, timeout_s=60) as client:
        def kill_and_replace():
            d.procs["verify"].kill()
            d.start("verify", name="replacement")
        ids, _ = await first_chunk_then(client.stream(PROMPT, max_new_tokens=MAX_NEW), kill_and_replace)
        status = await client.status()
    assert ids == reference(tiny_verify.tokenizer(PROMPT)["input_ids"], MAX_NEW)
    assert status.queued == 0 and status.active == 0


async def test_a_hung_forward_pass_is_told_apart_and_a_spare_takes_over(deploy, reference, tiny_verify):
    timeout_s = 0.5
    d = deploy(AMUSD_VERIFY_DELAY_MS=20, AMUSD_VERIFY_HANG_AFTER=8, AMUSD_PROGRESS_TIMEOUT_S=timeout_s)
    await d.wait_ready(timeout_s=120)
    d.start("verify", name="spare", AMUSD_VERIFY_HANG_AFTER="0")
    await d.wait_ready(verifiers=2, timeout_s=120)
    async with AsyncClient(d.url, timeout_s=30) as client:
        ids, times = await first_chunk_then(client.stream(PROMPT, max_new_tokens=MAX_NEW), None)
    assert ids == reference(tiny_verify.tokenizer(PROMPT)["input_ids"], MAX_NEW)
    # Its heartbeats never stopped: progress told the hang (a resend, then the same pass still running).
    assert d.procs["verify"].poll() is None
    assert "no forward pass finished" in (d.log_dir / "coordinator.log").read_text()
    async with AsyncClient(d.url, timeout_s=30) as client:  # and, hung, it does not come back for more work
        assert (await client.status()).verifiers == 1
    assert max(b - a for a, b in zip(times, times[1:])) < 2 * timeout_s + 2 * 0.25 + 2.0
