"""Both runners behind the one interface: sessions, rollbacks, verify and propose, the model thread."""
import asyncio
import random
import threading

import pytest
import torch

from amusd_mq import models
from amusd_mq.bench.baselines import autoregressive, speculative_sync
from amusd_mq.runtime.lm import Check, Guess, Row, SlotsExhausted, propose_guesses, verify_checks
from amusd_mq.runtime.load import load
from amusd_mq.runtime.thread import ModelThread
from amusd_mq.sampling import requested


@pytest.fixture(scope="module", params=["native", "hf"])
def runner_lm(request, tiny_cache):
    return load("tiny-verify", "cpu", "float32", tiny_cache, runner=request.param, slots=8)


def full_logits(hf_verify, seq):
    with torch.inference_mode():
        return hf_verify(torch.tensor([seq])).logits[0].float()


def test_cached_logits_survive_arbitrary_rollbacks(runner_lm, hf_verify):
    rng = random.Random(0)
    with runner_lm.session() as session:
        seq = [rng.randrange(runner_lm.vocab_size) for _ in range(6)]
        for _ in range(25):
            if rng.random() < 0.4:
                del seq[rng.randrange(1, len(seq)):]  # roll back to a random prefix; the caller says where
                session.rollback(len(seq))
            seq += [rng.randrange(runner_lm.vocab_size) for _ in range(rng.randrange(1, 5))]
            n_out = rng.randrange(1, len(seq) + 1)
            got = session.logits(seq, n_out)
            torch.testing.assert_close(got, full_logits(hf_verify, seq)[-n_out:], atol=1e-4, rtol=1e-4)
            assert session.length == len(seq)


def test_a_batch_of_rows_at_different_positions_is_each_rows_own(runner_lm, hf_verify):
    rng = random.Random(1)
    seqs = [[rng.randrange(runner_lm.vocab_size) for _ in range(n)] for n in (5, 12, 3)]
    with runner_lm.session() as a, runner_lm.session() as b, runner_lm.session() as c:
        sessions = [a, b, c]
        for s, seq in zip(sessions, seqs):
            s.logits(seq[:-2], 1)  # each cache holds its sequence but the last two tokens
        rows = [Row(s.slot, len(seq) - 2, seq[-2:], 2) for s, seq in zip(sessions, seqs)]
        for got, seq in zip(runner_lm.step(rows), seqs):
            torch.testing.assert_close(got, full_logits(hf_verify, seq)[-2:], atol=1e-4, rtol=1e-4)


def test_verify_greedy_accepts_the_agreeing_prefix_plus_one(runner_lm, reference):
    prompt = [10, 20, 30]
    ref = reference(prompt, 8)
    for k in range(0, 6):
        for wrong_at in [None, *range(k)]:
            draft = list(ref[:k])
            if wrong_at is not None:
                draft[wrong_at] = (draft[wrong_at] + 1) % runner_lm.vocab_size
            with runner_lm.session() as session:
                [(tokens, accepted)] = verify_checks(runner_lm, [Check(session, prompt, draft)])
                expect = k if wrong_at is None else wrong_at
                assert accepted == expect and tokens == ref[:expect + 1]
                assert session.length == len(prompt) + accepted  # the rejected guesses are rolled back


def test_a_batched_pass_decides_each_sequence_as_its_own_pass_would(runner_lm, reference):
    """Rows of different lengths, positions, drafts and sampling modes in one pass: each gets what a pass of its
    own gives, and each session is left at its own rollback point."""
    rng = random.Random(3)
    modes = [requested("greedy", 0.0, 0, 1.0, 1), requested("seeded", 0.8, 0, 1.0, 2)]
    cases = []
    for i in range(6):
        prompt = [rng.randrange(1, runner_lm.vocab_size) for _ in range(rng.randrange(2, 30))]
        ref = reference(prompt, 6)
        draft = list(ref[:rng.randrange(0, 6)])
        if draft and i % 2:
            draft[-1] = (draft[-1] + 1) % runner_lm.vocab_size
        cases.append((prompt, draft, modes[1] if i % 3 == 2 else modes[0]))
    solo = []
    for prompt, draft, sampling in cases:
        with runner_lm.session() as s:
            solo.append((verify_checks(runner_lm, [Check(s, prompt, draft, 0, sampling)])[0], s.length))
    sessions = [runner_lm.session() for _ in cases]
    try:
        together = verify_checks(runner_lm, [Check(s, prompt, draft, 0, sampling)
                                      for s, (prompt, draft, sampling) in zip(sessions, cases)])
        assert [(got, s.length) for got, s in zip(together, sessions)] == solo
        guesses = propose_guesses(runner_lm, [Guess(s, prompt + got[0], len(got[0]), sampling)
                                      for s, (prompt, _, sampling), got in zip(sessions, cases, together)])
        for (prompt, _, sampling), got, guess in zip(cases, together, guesses):
            with runner_lm.session() as s:
                assert propose_guesses(runner_lm, [Guess(s, prompt + got[0], len(got[0]), sampling)])[0] == guess
    finally:
        for s in sessions:
            s.close()


def test_autoregressive_matches_generate(runner_lm, reference):
    prompt = runner_lm.tokenizer("def fib(n):")["input_ids"]
    assert autoregressive(runner_lm, prompt, 30, runner_lm.eos_token_ids).token_ids == reference(prompt, 30)


@pytest.mark.parametrize("gamma", [1, 3, 6])
def test_synchronous_speculation_matches_generate(tiny_draft, tiny_verify, reference, gamma):
    for prompt in ("def fib(n):", "Hello, world"):
        ids = tiny_verify.tokenizer(prompt)["input_ids"]
        run = speculative_sync(tiny_draft, tiny_verify, ids, 30, tiny_verify.eos_token_ids, gamma)
        assert run.token_ids == reference(ids, 30)
        assert len(run.times) == len(run.token_ids) and run.times == sorted(run.times)
        assert 0 < run.accepted <= run.proposed <= gamma * run.verify_steps


def test_slots_are_bounded_and_come_back(tiny_cache):
    lm = load("tiny-verify", "cpu", "float32", tiny_cache, slots=2)
    first, second = lm.session(), lm.session()
    with pytest.raises(SlotsExhausted, match="AMUSD_MAX_BATCH"):
        lm.session()
    first.close()
    del second  # collected: its slot comes back too
    with lm.session(), lm.session():
        pass


def test_a_sequence_past_the_context_is_a_clear_error(tiny_cache):
    lm = load("tiny-verify", "cpu", "float32", tiny_cache, max_context=32)
    assert lm.max_context == 32
    with lm.session() as session, pytest.raises(ValueError, match="AMUSD_MAX_CONTEXT"):
        session.logits(list(range(40)), 1)


def test_tiny_models_are_deterministic_and_share_a_vocabulary(tiny_cache, tmp_path, tiny_verify, tiny_draft):
    assert tiny_draft.info.vocab_hash == tiny_verify.info.vocab_hash
    assert len(tiny_draft.model.layers) < len(tiny_verify.model.layers)
    rebuilt = load("tiny-verify", "cpu", "float32", str(tmp_path))
    assert torch.equal(rebuilt.model.embed, tiny_verify.model.embed)
    with rebuilt.session() as a, tiny_verify.session() as b:
        assert torch.equal(a.logits([5, 6, 7, 8], 4), b.logits([5, 6, 7, 8], 4))


def test_tiny_tokenizer_round_trips_any_text():
    tok = models.tiny_tokenizer()
    text = "héllo wörld λ 🙂\n\tend"
    assert tok.decode(tok(text)["input_ids"]) == text


def test_unknown_dtype_and_runner_are_clear_errors(tiny_cache):
    with pytest.raises(ValueError, match="dtype"):
        load("tiny-draft", "cpu", "int3", tiny_cache)
    with pytest.raises(ValueError, match="runner"):
        load("tiny-draft", "cpu", "float32", tiny_cache, runner="onnx")


def test_pypi_models_are_pinned():
    for parts in models.PYPI_MODELS.values():
        assert len(parts.sha256) == 64 and parts.count > 0 and parts.size > 0


@pytest.mark.asyncio
async def test_model_thread_keeps_the_event_loop_free():
    thread = ModelThread()
    release = threading.Event()
    job = thread.submit(release.wait, 5)
    ticks = 0
    for _ in range(5):  # the loop keeps running while the job blocks its thread
        await asyncio.sleep(0.01)
        ticks += 1
    assert ticks == 5 and not job.done()
    release.set()
    assert await job is True
    with pytest.raises(ZeroDivisionError):
        await thread.submit(lambda: 1 / 0)
