import argparse
import asyncio
import sys
from pathlib import Path

import pytest

from amusd_mq import config as c

ROOT = Path(__file__).resolve().parents[1]
SERVICES = ("coordinator", "verify", "draft", "gateway")


def past(setting: c.Setting) -> str:
    """A value just past a setting's bound."""
    bound = setting.bound
    if isinstance(bound, c.Range):
        value = bound.high + 1 if bound.high is not None else (bound.low if bound.above else bound.low - 1)
        return str(type(setting.default)(value))
    return {c.OneOf: "nonsense", c.Matches: " "}[type(bound)] if setting.name != "coordinator_url" else "udp://h:1"


BOUNDED = [s for s in c.SETTINGS if s.bound is not None]


def test_defaults_env_and_flags_in_order_of_precedence():
    assert c.load(env={}).lookahead == 8
    assert c.load(env={"AMUSD_LOOKAHEAD": "3"}).lookahead == 3
    parser = argparse.ArgumentParser()
    c.add_flags(parser)
    args = parser.parse_args(["--lookahead", "5", "--draft-wrong", "true"])
    cfg = c.load(args, env={"AMUSD_LOOKAHEAD": "3"})
    assert cfg.lookahead == 5 and cfg.draft_wrong is True


@pytest.mark.parametrize("env", [{"AMUSD_LOOKAHEAD": "0"}, {"AMUSD_LOOKAHEAD": "many"}, {"AMUSD_DRAFT_WRONG": "maybe"},
                                 {"AMUSD_HEARTBEAT_S": "-1"}, {"AMUSD_MAX_MESSAGE_BYTES": "10"}])
def test_bad_values_are_clear_errors(env):
    with pytest.raises(ValueError, match=next(iter(env))):
        c.load(env=env)


@pytest.mark.parametrize("setting", BOUNDED, ids=lambda s: s.name)
def test_every_bound_refuses_a_value_past_it_and_admits_the_default(setting):
    with pytest.raises(ValueError, match=setting.env):
        c.load(env={setting.env: past(setting)})
    setting.check(setting.default)


def test_bounds_in_their_own_words():
    assert not c.BY_NAME["lookahead"].bound.admits(65) and c.BY_NAME["lookahead"].bound.admits(64)
    assert c.load(env={"AMUSD_LOG_LEVEL": "debug"}).log_level == "debug"
    assert c.pub_url("tcp://10.0.0.1:5550") == "tcp://10.0.0.1:5551"
    for bad in ("tcp://host", "tcp://:5550", "udp://host:1", "ipc://", "tcp://h:65535"):
        with pytest.raises(ValueError):
            c.pub_url(bad)


def test_a_frame_limit_too_small_for_the_context_is_refused():
    with pytest.raises(ValueError, match="AMUSD_MAX_MESSAGE_BYTES.*AMUSD_MAX_CONTEXT=1000000"):
        c.load(env={"AMUSD_MAX_CONTEXT": "1000000"})
    assert c.load(env={"AMUSD_MAX_CONTEXT": "1000000", "AMUSD_MAX_MESSAGE_BYTES": str(c.frame_floor(1000000))})


def test_threads_share_the_cores_among_the_workers_on_cpu(monkeypatch):
    monkeypatch.setattr(c.os, "sched_getaffinity", lambda pid: set(range(8)))
    both = c.load(env={})
    assert both.threads_of(c.DRAFT) == both.threads_of(c.VERIFY) == 4
    gpu_verify = c.load(env={"AMUSD_VERIFY_DEVICE": "cuda:0"})
    assert gpu_verify.threads_of(c.VERIFY) == 1 and gpu_verify.threads_of(c.DRAFT) == 7
    assert c.load(env={"AMUSD_THREADS": "3"}).threads_of(c.DRAFT) == 3
    monkeypatch.setattr(c.os, "sched_getaffinity", lambda pid: {0})
    assert c.load(env={}).threads_of(c.DRAFT) == 1


async def _start(role: str, env: dict[str, str]) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", f"services.{role}", env=env, cwd=ROOT,
                                                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode, err.decode()


@pytest.mark.asyncio
async def test_every_service_refuses_to_start_with_a_setting_past_a_bound(tmp_path):
    """Each with code 2 and a message naming the setting, before it loads anything: a value it would refuse on
    every request (AMUSD_LOOKAHEAD=65 once was) never gets as far as a request."""
    cases = [(s.env, {s.env: past(s)}) for s in BOUNDED]
    cases.append(("AMUSD_MAX_MESSAGE_BYTES", {"AMUSD_MAX_CONTEXT": "1000000"}))
    base = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "AMUSD_CACHE_DIR": str(tmp_path)}
    runs = [(name, role, _start(role, {**base, **env})) for name, env in cases for role in SERVICES]
    gate = asyncio.Semaphore(4)

    async def bounded(coro):
        async with gate:
            return await coro

    results = await asyncio.gather(*(bounded(coro) for _, _, coro in runs))
    for (name, role, _), (code, err) in zip(runs, results):
        assert code == 2 and name in err, (role, name, code, err[-500:])


def test_each_role_gets_only_its_flags():
    parser = argparse.ArgumentParser()
    c.add_flags(parser, c.DRAFT)
    flags = {a.dest for a in parser._actions}
    assert "draft_model" in flags and "verify_model" not in flags and "coordinator_url" in flags


def test_settings_and_config_agree():
    assert [s.name for s in c.SETTINGS] == [f for f in c.Config.__dataclass_fields__]


def test_env_example_is_the_settings_list():
    assert (ROOT / ".env.example").read_text() == c.env_example(), \
        "regenerate it: python -c 'from amusd_mq import config; print(config.env_example(), end=\"\")' > .env.example"


def test_readme_documents_every_setting():
    readme = (ROOT / "README.md").read_text()
    missing = [s.env for s in c.SETTINGS if f"`{s.env}`" not in readme]
    assert not missing
