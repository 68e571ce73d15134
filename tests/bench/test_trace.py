"""Recorded traces replay the real pair's decisions exactly, in-process and through the services."""
import json

import pytest
from conftest import PROMPTS

from amusd_mq import AsyncClient
from amusd_mq.bench.baselines import autoregressive, speculative_sync
from amusd_mq.bench.trace import LatencyProfile, Trace, TraceLM, record


@pytest.fixture(scope="module")
def pair(tiny_draft, tiny_verify):
    return tiny_draft, tiny_verify


@pytest.fixture(scope="module")
def traced(pair, tmp_path_factory):
    draft, verify = pair
    prompts = [(f"p{i}", verify.tokenizer(text)["input_ids"]) for i, text in enumerate(PROMPTS[:8])]
    trace = record(draft, verify, prompts, 24, "float32")
    path = tmp_path_factory.mktemp("trace") / "trace.json"
    trace.save(path)
    profile = path.parent / "profile.json"
    profile.write_text(json.dumps({"draft_ms": 0.5, "verify_ms": {"1": 2, "9": 3}}))
    return trace, path, profile


def test_trace_round_trips_and_records_teacher_forced_guesses(traced, pair):
    trace, path, _ = traced
    assert Trace.load(path) == trace
    draft, verify = pair
    for p in trace.prompts:
        assert len(p.draft) == len(p.target)
        # the guess at i is the draft's own next token after prompt + target[:i]
        i = len(p.target) // 2
        with draft.session() as session:
            assert p.draft[i] == session.greedy(p.prompt_ids + p.target[:i], 1)[0]
    assert 0.3 < trace.acceptance() < 1.0


@pytest.mark.parametrize("gamma", [1, 4])
def test_replayed_decisions_equal_the_real_ones(traced, pair, gamma):
    trace, path, profile = traced
    draft, verify = pair
    spec = f"trace:{path}"
    t_draft = TraceLM(spec, "draft", f"latency:{profile}", "native")
    t_verify = TraceLM(spec, "verify", f"latency:{profile}", "native")
    for p in trace.prompts:
        eos = verify.eos_token_ids
        assert autoregressive(t_verify, p.prompt_ids, 24, eos).token_ids == p.target
        real = speculative_sync(draft, verify, p.prompt_ids, 24, eos, gamma)
        replay = speculative_sync(t_draft, t_verify, p.prompt_ids, 24, eos, gamma)
        assert replay.token_ids == real.token_ids == p.target
        assert (replay.proposed, replay.accepted, replay.verify_steps) == (real.proposed, real.accepted,
                                                                           real.verify_steps)


@pytest.mark.parametrize("runner", ["native", "hf"])
def test_shaped_compute_runs_a_real_forward_on_the_runner(traced, runner):
    trace, path, _ = traced
    lm = TraceLM(f"trace:{path}", "verify", "shape:tiny,tiny", runner, "cpu", "float32")
    assert lm.runner == runner
    p = trace.prompts[0]
    assert autoregressive(lm, p.prompt_ids, 24, trace.eos_token_ids).token_ids == p.target
    with lm.session() as session:
        session.greedy(p.prompt_ids, 1)
        assert session.compute.length == len(p.prompt_ids)  # the shaped model really took the prompt


def test_bad_compute_spec_is_a_clear_error(traced):
    _, path, _ = traced
    with pytest.raises(ValueError, match="latency:PROFILE"):
        TraceLM(f"trace:{path}", "verify", "gpu-please", "native")


def test_latency_profile_sets_step_times(traced):
    _, _, profile = traced
    lat = LatencyProfile.load(profile)
    assert lat.draft_ms == 0.5 and lat.verify(5) == 2.5


@pytest.mark.asyncio
async def test_services_replay_a_trace(deploy, traced):
    trace, path, profile = traced
    d = deploy(AMUSD_DRAFT_MODEL=f"trace:{path}", AMUSD_VERIFY_MODEL=f"trace:{path}",
               AMUSD_TRACE_COMPUTE=f"latency:{profile}")
    await d.wait_ready(timeout_s=120)
    async with AsyncClient(d.url, timeout_s=30) as client:
        for p in trace.prompts:
            for policy in ("eager", "amusd"):
                r = await client.generate(prompt_ids=p.prompt_ids, max_new_tokens=24, policy=policy)
                assert r.token_ids == p.target and r.text == ""
        with pytest.raises(Exception, match="prompt_ids"):
            await client.generate("text needs a tokenizer", max_new_tokens=4)
