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


class TextStream:
    """A request's text as its tokens are committed. With stop strings, it ends before the first one to appear,
    and holds back a tail that could be the start of one, so a client never sees part of a stop string."""

    def __init__(self, tokenizer: Tokenizer | None, stop: list[str] = ()):
        self._detok = Detokenizer(tokenizer)
        self._stop = [s for s in stop if s]
        self._hold = max(map(len, self._stop), default=1) - 1
        self._pending = ""  # decoded and not yet sent

    def push(self, ids: list[int]) -> tuple[str, int | None]:
        """The text to send for newly committed ids and, if a stop string appeared, how many of them to keep."""
        if not self._stop:
            return self._detok.push(ids), None
        for i, token in enumerate(ids):
            self._pending += self._detok.push([token])
            found = [at for s in self._stop if (at := self._pending.find(s)) >= 0]
            if found:
                text, self._pending = self._pending[:min(found)], ""
                return text, i + 1
        settled = max(0, len(self._pending) - self._hold)
        text, self._pending = self._pending[:settled], self._pending[settled:]
        return text, None

    def flush(self) -> str:
        """What is held back, at the end of a request that stopped for another reason."""
        text, self._pending = self._pending + self._detok.flush(), ""
        return text
