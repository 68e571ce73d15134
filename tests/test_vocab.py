"""The vocabulary the coordinator serves, from its own configuration, names the same mapping the workers hash."""
import json

import pytest

from amusd_mq import vocab
from amusd_mq.runtime.load import load


def test_the_coordinators_vocabulary_is_the_workers(tiny_cache, tiny_verify, tiny_draft):
    served = vocab.load("tiny-verify", tiny_cache)
    assert served.hash == tiny_verify.info.vocab_hash
    assert served.hash == tiny_draft.info.vocab_hash  # the pair shares one
    assert served.tokenizer.encode("def fib(n):").ids == tiny_verify.tokenizer("def fib(n):")["input_ids"]


def test_one_added_token_is_another_vocabulary(tiny_cache, odd_draft):
    assert vocab.load(odd_draft, tiny_cache).hash != vocab.load("tiny-verify", tiny_cache).hash
    assert load(odd_draft, "cpu", "float32", tiny_cache).info.vocab_hash == vocab.load(odd_draft, tiny_cache).hash


def test_a_trace_stands_for_the_model_it_was_recorded_from(tmp_path):
    trace = tmp_path / "t.json"
    trace.write_text(json.dumps({"verify_model": "m", "vocab_size": 7, "prompts": []}))
    served = vocab.load(vocab.TRACE_PREFIX + str(trace), None)
    assert served.tokenizer is None and served.hash == vocab.trace_hash("m", 7) != vocab.trace_hash("m", 8)


def test_a_directory_without_a_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no tokenizer.json"):
        vocab.load(str(tmp_path), None)
