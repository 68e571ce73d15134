"""The vocabulary the coordinator serves, from its own configuration, names the same mapping the workers hash."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from amusd_mq import AsyncClient, models
from amusd_mq.bench import trace as bench_trace
from amusd_mq.bench.trace import Trace, trace_hash
from amusd_mq.runtime.load import load
from amusd_mq.text import vocab


def test_the_coordinators_vocabulary_is_the_workers(tiny_cache, tiny_verify, tiny_draft):
    served = vocab.load("tiny-verify", tiny_cache)
    assert served.hash == tiny_verify.info.vocab_hash
    assert served.hash == tiny_draft.info.vocab_hash  # the pair shares one
    assert served.tokenizer.encode("def fib(n):").ids == tiny_verify.tokenizer("def fib(n):")["input_ids"]


def test_a_token_transformers_adds_at_load_time_is_in_both_vocabularies(saved_model):
    served = vocab.load(saved_model, None)
    assert "<|turn_end|>" in served.tokenizer.get_vocab(with_added_tokens=True)
    assert served.hash == load(saved_model, "cpu", "float32").info.vocab_hash


def test_one_added_token_is_another_vocabulary(tiny_cache, odd_draft):
    assert vocab.load(odd_draft, tiny_cache).hash != vocab.load("tiny-verify", tiny_cache).hash
    assert load(odd_draft, "cpu", "float32", tiny_cache).info.vocab_hash == vocab.load(odd_draft, tiny_cache).hash


def test_a_trace_stands_for_the_model_it_was_recorded_from(tmp_path):
    """Served by the benchmark's plugin, found through its entry point: the serving code never names it."""
    trace = tmp_path / "t.json"
    Trace(draft_model="d", verify_model="m", dtype="float32", vocab_size=7, eos_token_ids=[2], max_new_tokens=4,
          prompts=[]).save(trace)
    served = vocab.load(f"trace:{trace}", None)
    assert served.tokenizer is None and served.hash == trace_hash("m", 7) != trace_hash("m", 8)
    assert models.plugin(f"trace:{trace}") is bench_trace and models.plugin("org/model") is None
    assert models.plugin("nothing-registered:x") is None


def test_a_directory_without_a_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no tokenizer.json"):
        vocab.load(str(tmp_path), None)


@pytest.mark.asyncio
async def test_a_model_saved_by_save_pretrained_is_served_greedy_identical(deploy, saved_model):
    d = deploy(AMUSD_VERIFY_MODEL=saved_model, AMUSD_DRAFT_MODEL=saved_model)
    await d.wait_ready(timeout_s=120)
    model = AutoModelForCausalLM.from_pretrained(saved_model, dtype=torch.float32).eval()
    async with AsyncClient(d.url, timeout_s=30) as client:
        for prompt in ("def fib(n):", "Hello, world"):
            result = await client.generate(prompt, max_new_tokens=24)
            with torch.inference_mode():
                ids = torch.tensor([result.prompt_ids])
                expected = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                          max_new_tokens=24, pad_token_id=0)[0, ids.shape[1]:].tolist()
            assert result.token_ids == expected
            assert result.prompt_ids == vocab.load_tokenizer(saved_model)(prompt)["input_ids"]
