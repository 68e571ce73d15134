"""What a worker serves: a causal LM behind one interface, whichever runner computes it, and the sessions that
hold one sequence's KV cache each.

A runner takes a batch of rows in one step: each row is a slot (one sequence's cache), the position its new
tokens start at, the tokens, and how many of the last positions it wants logits for. A session owns a slot
and the length of its cache that is still valid; the caller, who knows where a sequence was rolled back, says
so with `rollback`, and nothing is compared or copied to find it.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from ..sampling import GREEDY, Sampling

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
RUNNERS = ("native", "hf")


@dataclass(frozen=True)
class Row:
    slot: int
    start: int  # the position of tokens[0]
    tokens: list[int]
    n_out: int  # logits for the last n_out tokens


class SlotsExhausted(RuntimeError):
    """Every KV-cache slot is taken: a worker serves at most AMUSD_KV_SLOTS sequences at once."""


@dataclass(frozen=True)
class ModelInfo:
    """What a worker registers with."""
    name: str
    vocab_size: int
    max_context: int  # the longest sequence a slot holds
    eos_token_ids: list[int]
    vocab_hash: str  # names the token-id mapping: draft and verify must agree on it


class LM:
    """A model and its KV-cache slots. Subclasses name their runner and implement `step`."""
    runner = ""  # "native" or "hf", reported with every result

    def __init__(self, info: ModelInfo, slots: int, tokenizer=None):
        self.info = info
        self.tokenizer = tokenizer  # transformers' tokenizer of a model directory; None for a trace replay
        self._free = list(range(slots - 1, -1, -1))

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def vocab_size(self) -> int:
        return self.info.vocab_size

    @property
    def max_context(self) -> int:
        return self.info.max_context

    @property
    def eos_token_ids(self) -> list[int]:
        return self.info.eos_token_ids

    def step(self, rows: list[Row]) -> list[torch.Tensor]:
        """Each row's logits, [n_out, vocab] in float32, after writing its tokens into its slot."""
        raise NotImplementedError

    def open_slot(self) -> int:
        if not self._free:
            raise SlotsExhausted("every KV-cache slot is in use (AMUSD_KV_SLOTS)")
        return self._free.pop()

    def free_slot(self, slot: int) -> None:
        self._free.append(slot)

    def session(self) -> "Session":
        return Session(self)

    def warm_up(self) -> None:
        """A short sequence through a session, so the first request doesn't pay for allocation and kernel choice."""
        with self.session() as s:
            s.logits(list(range(8)), 2)


class Session:
    """One sequence's KV cache: a slot, and how many of its leading positions are valid. The slot goes back to
    the model on `close()`, at the end of a `with` block, or when the session is collected."""

    def __init__(self, lm: LM):
        self.lm = lm
        self.slot = lm.open_slot()
        self.length = 0
        self._close = weakref.finalize(self, lm.free_slot, self.slot)

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._close()

    def rollback(self, length: int) -> None:
        """Only the first `length` positions still hold the sequence: the next step writes from there."""
        self.length = min(self.length, length)

    def logits(self, seq: list[int], n_out: int) -> torch.Tensor:
        """Logits [n_out, vocab] predicting the tokens after each of the last n_out positions of seq, which must
        extend the first `length` positions the cache holds."""
        start = min(self.length, len(seq) - n_out)
        out = self.lm.step([Row(self.slot, start, seq[start:], n_out)])[0]
        self.length = len(seq)
        return out

    def greedy(self, seq: list[int], n_out: int) -> list[int]:
        return self.logits(seq, n_out).argmax(-1).tolist()


def verify(session: Session, seq: list[int], draft: list[int], start: int = 0, sampling: Sampling = GREEDY,
           q: list[tuple[list[int], list[float]]] | None = None) -> tuple[list[int], int]:
    """One verify pass after `seq`, whose next token is generated position `start`: the accepted prefix of
    `draft`, plus the verifier's own next token. In greedy and seeded mode the accepted prefix is the one the
    model agrees with; in exact mode, rejection sampling against the draft's distributions `q`. The session is
    left holding seq and the accepted tokens."""
    n = len(draft) + 1
    if sampling.mode == "exact":
        tokens, accepted = sampling.verify_exact(session.logits(seq + draft, n), draft, start, q)
    else:
        choices = (session.greedy(seq + draft, n) if sampling.mode == "greedy" else
                   sampling.choose(session.logits(seq + draft, n), list(range(start, start + n))))
        accepted = 0
        while accepted < len(draft) and draft[accepted] == choices[accepted]:
            accepted += 1
        tokens = draft[:accepted] + [choices[accepted]]
    session.rollback(len(seq) + accepted)
    return tokens, accepted


def propose(session: Session, seq: list[int], position: int,
            sampling: Sampling = GREEDY) -> tuple[int, list[int] | None, list[float] | None]:
    """The draft's next token after `seq` (generated position `position`), with its distribution in exact mode."""
    if sampling.mode == "greedy":
        return session.greedy(seq, 1)[0], None, None
    return sampling.propose(session.logits(seq, 1), position)
