"""The vocabulary a deployment serves: the verify model's tokenizer, the hash that names its id mapping, and its
chat template.

Every service loads a model's tokenizer through `load_tokenizer` and names its mapping through
`Vocabulary.of`, so the coordinator and the workers can't disagree about one model: transformers adds at load
time what a model's files leave to it (a special token named in tokenizer_config.json but missing from
tokenizer.json), which a second way of loading the files would not see. The coordinator loads the vocabulary
from its own configuration (`AMUSD_VERIFY_MODEL`), so which workers it admits never depends on who registers
first: a worker whose hash differs is refused, whatever the order.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer
from transformers import AutoTokenizer

from .. import models
from .chat import ChatTemplate


@dataclass(frozen=True)
class Vocabulary:
    hash: str
    tokenizer: Tokenizer | None  # what encodes prompts and decodes output; None for a plugin's ids-only model
    chat: ChatTemplate | None = None  # None when the model has no chat template

    @classmethod
    def of(cls, tokenizer) -> Vocabulary:
        """The vocabulary of transformers' tokenizer as `load_tokenizer` loaded it. The hash covers the token-id
        mapping, added tokens included: draft and verify must agree on it."""
        backend = tokenizer.backend_tokenizer
        mapping = sorted(backend.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])
        digest = hashlib.sha256(json.dumps(mapping, ensure_ascii=False).encode()).hexdigest()
        return cls(digest, backend, ChatTemplate.of(tokenizer))

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """A chat's prompt ids (ChatError if the template refuses the messages)."""
        # The template writes any special tokens the model expects; the tokenizer must not add its own.
        return self.tokenizer.encode(self.chat.render(messages), add_special_tokens=False).ids


def load_tokenizer(path: str):
    """transformers' tokenizer of a model directory or hub id: the one loader of every service."""
    if Path(path).is_dir() and not (Path(path) / "tokenizer.json").exists():
        raise ValueError(f"{path} has no tokenizer.json (a fast tokenizer's file, which every service loads)")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        raise ValueError(f"{path}: transformers loaded no fast tokenizer; save one with the model (tokenizer.json)")
    return tokenizer


def load(model: str, cache_dir: str | None) -> Vocabulary:
    """The vocabulary of a model name as the workers resolve it (building a local model on first use), or as the
    plugin serving it says."""
    served_by = models.plugin(model)
    if served_by is not None:
        return served_by.vocabulary(model)
    return Vocabulary.of(load_tokenizer(models.resolve(model, cache_dir)))
