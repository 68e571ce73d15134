"""An exception injected into each core loop of each service: a receive loop logs it with its traceback and serves
on; a scheduler or heartbeat task ends its process with a non-zero exit, so a supervisor restarts it. Never a live
process that has stopped serving.

The faults are injected through a `sitecustomize` module on the service's PYTHONPATH, which wraps one method of
the real service before it starts.
"""
import asyncio
import textwrap

import pytest
from test_verifier_loss import PROMPT

from amusd_mq import AmusdError, AsyncClient, ClientClosedError
from amusd_mq.frontend import client as client_module

pytestmark = pytest.mark.asyncio

# Each raises inside a running loop: once the loop has run for a second, or at the loop's third message.
AFTER_A_SECOND = """
import asyncio
from {module} import {cls} as target
original = target.{method}

async def failing(self, *args):
    try:
        await asyncio.wait_for(original(self, *args), 1.0)
    except TimeoutError:
        raise RuntimeError("fault injected into {cls}.{method}")

target.{method} = failing
"""
AT_THE_THIRD_CALL = """
from {module} import {cls} as target
original = target.{method}
calls = []

def failing(self, *args):  # returns the coroutine of an async method, for its caller to await
    calls.append(1)
    if len(calls) == 3:
        raise RuntimeError("fault injected into {cls}.{method}")
    return original(self, *args)

target.{method} = failing
"""


def inject(tmp_path, template: str, module: str, cls: str, method: str) -> dict[str, str]:
    """The environment that makes a service start with the fault in place."""
    (tmp_path / "sitecustomize.py").write_text(textwrap.dedent(template.format(module=module, cls=cls, method=method)))
    return {"PYTHONPATH": str(tmp_path)}


@pytest.mark.parametrize("role,module,cls,method", [
    ("coordinator", "amusd_mq.coordinator.shell", "Coordinator", "_tick"),
    ("verify", "amusd_mq.workers.step", "Worker", "_heartbeat"),
    ("draft", "amusd_mq.workers.step", "Worker", "_heartbeat"),
])
async def test_a_failed_scheduler_or_heartbeat_ends_the_process_non_zero(deploy, tmp_path, role, module, cls, method):
    d = deploy(roles=tuple(r for r in ("coordinator", "verify", "draft") if r != role))
    proc = d.start(role, **inject(tmp_path, AFTER_A_SECOND, module, cls, method))
    code = await asyncio.to_thread(proc.wait, 120)
    log = d.log_tail(role, 80)
    assert code == 1, log
    assert "Traceback" in log and f"fault injected into {cls}.{method}" in log
    assert f"the {role} service failed; exiting so that it can be restarted" in log
    d.procs.pop(role)


@pytest.mark.parametrize("role,module,cls,method", [
    ("coordinator", "amusd_mq.coordinator.core", "Core", "on_verdict"),
    ("verify", "amusd_mq.workers.verify", "VerifyWorker", "on_propose"),
    ("draft", "amusd_mq.workers.draft", "DraftWorker", "on_commit"),
])
async def test_a_failed_message_is_logged_and_its_loop_serves_on(deploy, reference, tiny_verify, tmp_path,
                                                                   role, module, cls, method):
    d = deploy(roles=tuple(r for r in ("coordinator", "verify", "draft") if r != role), AMUSD_VERIFY_DELAY_MS=10,
               AMUSD_PROGRESS_TIMEOUT_S=1.0)
    d.start(role, **inject(tmp_path, AT_THE_THIRD_CALL, module, cls, method))
    await d.wait_ready(timeout_s=120)
    async with AsyncClient(d.url, timeout_s=30) as client:
        results = [await client.generate(prompt, max_new_tokens=30) for prompt in (PROMPT, "Hello, world")]
    for prompt, r in zip((PROMPT, "Hello, world"), results):
        assert r.token_ids == reference(tiny_verify.tokenizer(prompt)["input_ids"], 30)
    d.check_alive()
    log = d.log_tail(role, 200)
    assert "Traceback" in log and f"fault injected into {cls}.{method}" in log
    assert log.count("registered with") <= 1  # a worker served on in its first registration


async def test_a_client_whose_reader_fails_fails_every_waiting_request_at_once(deploy, monkeypatch):
    d = deploy(AMUSD_VERIFY_DELAY_MS=10)
    await d.wait_ready(timeout_s=120)
    async with AsyncClient(d.url, timeout_s=60) as client:
        stream = client.stream(PROMPT, max_new_tokens=2000, ignore_eos=True)
        await stream.__anext__()
        waiting = asyncio.create_task(client.generate(PROMPT, max_new_tokens=10))

        async def broken_recv(*args, **kwargs):
            raise MemoryError("fault injected into the client's reader")

        monkeypatch.setattr(client_module, "recv", broken_recv)  # called for the next message after this one
        with pytest.raises(ClientClosedError, match="fault injected"):
            async with asyncio.timeout(5):  # at once, not after the 60 s silence timeout
                async for _ in stream:
                    pass
        with pytest.raises(ClientClosedError, match="fault injected"):
            await asyncio.wait_for(waiting, 5)
        with pytest.raises(AmusdError):
            await client.status()
