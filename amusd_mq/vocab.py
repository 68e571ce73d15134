"""The vocabulary a deployment serves: the verify model's tokenizer, the hash that names its id mapping, and its
chat template.

The coordinator loads it from its own configuration (`AMUSD_VERIFY_MODEL`), so which workers it admits
never depends on who registers first: a worker whose hash differs is refused, whatever the order.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from . import models
from .chat import ChatTemplate

TRACE_PREFIX = "trace:"  # a model name replaying a recorded trace (benchmarks): prompt ids only, no tokenizer


@dataclass(frozen=True)
class Vocabulary:
    hash: str
    tokenizer: Tokenizer | None  # None for a trace replay, which takes prompt_ids only
    chat: ChatTemplate | None = None  # None when the model has no chat template


def tokenizer_hash(tokenizer: Tokenizer) -> str:
    """Identifies the token-id mapping, added tokens included: draft and verify must agree on it."""
    vocab = sorted(tokenizer.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()


def trace_hash(verify_model: str, vocab_size: int) -> str:
    """A trace replays the ids of the model it was recorded from; its name and size stand for its mapping."""
    return hashlib.sha256(f"{verify_model}/{vocab_size}".encode()).hexdigest()


def load(model: str, cache_dir: str | None) -> Vocabulary:
    """The vocabulary of a model name as the workers resolve it (building a local model on first use)."""
    if model.startswith(TRACE_PREFIX):
        head = json.loads(Path(model[len(TRACE_PREFIX):]).read_text())
        return Vocabulary(trace_hash(head["verify_model"], head["vocab_size"]), None)
    path = Path(models.resolve(model, cache_dir))
    if path.is_dir():
        if not (path / "tokenizer.json").exists():
            raise ValueError(f"{model}: {path} has no tokenizer.json")
        tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        return Vocabulary(tokenizer_hash(tokenizer), tokenizer, ChatTemplate.load(path))
    tokenizer = Tokenizer.from_pretrained(model)
    return Vocabulary(tokenizer_hash(tokenizer), tokenizer)
