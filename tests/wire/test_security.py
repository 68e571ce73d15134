"""CURVE: with it on, only peers holding an allowed key get anything in or out, and the output is unchanged."""
import asyncio
import os
import time

import pytest
import zmq
import zmq.asyncio

from amusd_mq import AsyncClient, CoordinatorUnavailableError, cli
from amusd_mq.config import SERVICES, pub_url
from amusd_mq.wire.security import keygen, load_keys, secure
from amusd_mq.wire.transport import make_socket

PROMPT, MAX_NEW = "def fib(n):", 40
SECRET, SERVER, ALLOW = "AMUSD_CURVE_SECRET_KEY", "AMUSD_CURVE_SERVER_KEY", "AMUSD_CURVE_ALLOW_DIR"


def client(url: str, env: dict[str, str], timeout_s: float = 30) -> AsyncClient:
    return AsyncClient(url, timeout_s=timeout_s, curve_secret_key=env.get(SECRET, ""),
                       curve_server_key=env.get(SERVER, ""))


async def hears_beats(url: str, env: dict[str, str]) -> bool:
    """Whether a subscriber with these keys gets anything from the coordinator's PUB stream."""
    ctx = zmq.asyncio.Context()
    sub = make_socket(ctx, zmq.SUB, 1 << 20)
    secure(sub, load_keys("client", env.get(SECRET, ""), env.get(SERVER, "")))
    sub.subscribe(b"")
    sub.connect(pub_url(url))
    try:
        await asyncio.wait_for(sub.recv(), 1.5)  # beats come every 0.25 s
        return True
    except asyncio.TimeoutError:
        return False
    finally:
        sub.close()
        ctx.term()


@pytest.mark.asyncio
async def test_only_allowed_keys_get_in(deploy, curve_keys, reference, tiny_verify, tmp_path):
    good = curve_keys["client"]
    stranger = {**good, SECRET: keygen(tmp_path / "other", ["stranger"])["stranger"][SECRET]}
    d = deploy(roles=(), **good)
    for role in SERVICES:
        d.start(role, **curve_keys[role])
    d.start("verify", name="intruder", **stranger)
    await d.wait_ready(timeout_s=120)
    expected = reference(tiny_verify.tokenizer(PROMPT)["input_ids"], MAX_NEW)
    async with client(d.url, good) as c:
        assert (await c.generate(PROMPT, max_new_tokens=MAX_NEW)).token_ids == expected

    for env, hint in (({}, "requires CURVE keys"), (stranger, "refused this client's CURVE key")):
        start = time.monotonic()
        with pytest.raises(CoordinatorUnavailableError, match=hint):
            async with client(d.url, env, timeout_s=1.0):
                pass  # not even a Welcome gets through
        assert time.monotonic() - start < 2.0
    assert await asyncio.gather(*(hears_beats(d.url, env) for env in (good, {}, stranger))) == [True, False, False]

    deadline = time.monotonic() + 60
    while "registering again" not in d.log_tail("intruder"):  # it tried, and heard nothing back
        d.check_alive()
        assert time.monotonic() < deadline, d.log_tail("intruder")
        await asyncio.sleep(0.2)
    async with client(d.url, good) as c:
        status = await c.status()
        assert (await c.generate(PROMPT, max_new_tokens=MAX_NEW)).token_ids == expected
    assert (status.verifiers, status.drafts) == (1, 1)  # the intruder never registered
    assert status.rejected["not_allowed"] >= 2 and status.rejected["handshake_failed"] >= 1
    assert status.served == 1  # the refused peers got no request in


def test_keygen_writes_pairs_and_the_allow_list(tmp_path, capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["keygen", str(tmp_path / "keys"), "--names", "coordinator,draft,verify,client"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    keys = tmp_path / "keys"
    assert sorted(p.name for p in (keys / "allowed").iterdir()) == ["client.key", "draft.key", "verify.key"]
    assert os.stat(keys / "client.key_secret").st_mode & 0o077 == 0
    assert f"{SECRET}={keys / 'coordinator.key_secret'} {ALLOW}={keys / 'allowed'}" in out
    assert f"{SECRET}={keys / 'draft.key_secret'} {SERVER}={keys / 'coordinator.key'}" in out
    with pytest.raises(SystemExit) as again:  # never overwrite keys others may depend on
        cli.main(["keygen", str(keys), "--names", "client"])
    assert again.value.code == 2 and "already exist" in capsys.readouterr().err


def test_half_a_configuration_is_refused_at_startup(curve_keys, tmp_path, capsys):
    worker, coordinator = curve_keys["verify"], curve_keys["coordinator"]
    with pytest.raises(ValueError, match=SERVER):
        load_keys("verify", worker[SECRET], "")
    with pytest.raises(ValueError, match=SECRET):
        load_keys("coordinator", "", coordinator[ALLOW])
    with pytest.raises(ValueError, match="holds no secret key"):
        load_keys("client", worker[SERVER], worker[SERVER])
    with pytest.raises(ValueError, match=SERVER):
        load_keys("draft", worker[SECRET], str(tmp_path / "missing.key"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no NAME.key public keys"):
        load_keys("coordinator", coordinator[SECRET], str(tmp_path / "empty"))
    with pytest.raises(ValueError, match=SERVER):
        AsyncClient("ipc:///nowhere", curve_secret_key=worker[SECRET], curve_server_key="")
    with pytest.raises(SystemExit) as exit_:  # before any model loads
        cli.main(["verify", "--curve-secret-key", worker[SECRET]])
    assert exit_.value.code == 2 and SERVER in capsys.readouterr().err
    assert load_keys("coordinator", "", "") is None
