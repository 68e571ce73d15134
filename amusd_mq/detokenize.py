"""Streaming text from token ids without splitting multi-byte characters."""
from __future__ import annotations

from tokenizers import Tokenizer


class Detokenizer:
    """Decodes a window of recent ids and emits only text that can no longer change (TGI's scheme)."""

    def __init__(self, tokenizer: Tokenizer | None):
        self._tok = tokenizer
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True) if self._tok is not None else ""

    def push(self, ids: list[int]) -> str:
        self._ids.extend(ids)
        settled = self._decode(self._ids[self._prefix:self._read])
        text = self._decode(self._ids[self._prefix:])
        if len(text) > len(settled) and not text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return text[len(settled):]
        return ""

    def flush(self) -> str:
        """Whatever is held back at the end of a request, replacement characters included."""
        settled = self._decode(self._ids[self._prefix:self._read])
        text = self._decode(self._ids[self._prefix:])
        self._prefix = self._read = len(self._ids)
        return text[len(settled):]
