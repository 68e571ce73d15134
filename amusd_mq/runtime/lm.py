"""What a worker serves: a causal LM behind one interface, whichever runner computes it, and the sessions that
hold one sequence's KV cache each.

A runner takes a batch of rows in one step: each row is a slot (one sequence's cache), the position its new
tokens start at, the tokens, and how many of the last positions it wants logits for. A session owns a slot
and the length of its cache that is still valid; the caller, who knows where a sequence was rolled back, says
so with `rollback`, and nothing is compared or copied to find it. `verify_checks` and `propose_guesses` take many sequences
at once and run them in one forward pass.
"""
from __future__ import annotations

import time
import weakref
from dataclasses import dataclass

import torch

from .. import config
from ..sampling import GREEDY, Sampling
from ..wire.codes import Mode

DTYPES = {name: getattr(torch, name) for name in config.DTYPES}


@dataclass(frozen=True)
class Row:
    slot: int
    start: int  # the position of tokens[0]
    tokens: list[int]
    n_out: int  # logits for the last n_out tokens


class SlotsExhausted(RuntimeError):
    """Every KV-cache slot is taken: a worker serves at most AMUSD_MAX_BATCH sequences at once."""


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
    kernels = "aten"  # what computes its linear layers (runtime.kernels), reported with every result

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

    def logits(self, feeds: list["Feed"]) -> list[torch.Tensor]:
        """Each feed's logits [n_out, vocab] in one step; each session then holds its whole sequence."""
        out = self.step([Row(f.session.slot, f.start, f.seq[f.start:], f.n_out) for f in feeds])
        for f in feeds:
            f.session.length = len(f.seq)
        return out

    def greedy(self, feeds: list["Feed"]) -> list[list[int]]:
        """Each feed's argmax choices, with one copy to the host for the whole batch."""
        logits = self.logits(feeds)
        flat = torch.cat([x.argmax(-1) for x in logits]).tolist()
        out, at = [], 0
        for f in feeds:
            out.append(flat[at:at + f.n_out])
            at += f.n_out
        return out

    def open_slot(self) -> int:
        if not self._free:
            raise SlotsExhausted("every KV-cache slot is in use (AMUSD_MAX_BATCH)")
        return self._free.pop()

    def free_slot(self, slot: int) -> None:
        self._free.append(slot)

    def session(self) -> "Session":
        return Session(self)

    def time_pass(self, rows: int, width: int, context: int = 64) -> float:
        """Milliseconds of one step of `rows` sequences, each feeding `width` tokens after `context` cached ones:
        the cost a verifier plans its batches with."""
        context = max(1, min(context, self.max_context - width))
        sessions = [self.session() for _ in range(rows)]
        try:
            prefix = [i % self.vocab_size for i in range(1, context + 1)]
            self.logits([Feed(s, prefix, 1) for s in sessions])
            best = float("inf")
            for _ in range(2):
                for s in sessions:
                    s.rollback(context)
                start = time.perf_counter()
                self.greedy([Feed(s, prefix + [1] * width, width) for s in sessions])
                best = min(best, (time.perf_counter() - start) * 1000)
            return best
        finally:
            for s in sessions:
                s.close()

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
        return self.lm.logits([Feed(self, seq, n_out)])[0]

    def greedy(self, seq: list[int], n_out: int) -> list[int]:
        return self.lm.greedy([Feed(self, seq, n_out)])[0]


@dataclass(frozen=True)
class Feed:
    """One sequence of a batched step: the session holding its cache, the whole sequence, and how many of its
    last positions want logits."""
    session: Session
    seq: list[int]
    n_out: int

    @property
    def start(self) -> int:
        """Where its new tokens begin: after what the cache still holds, and no later than the first position
        that wants logits."""
        return min(self.session.length, len(self.seq) - self.n_out)


@dataclass(frozen=True)
class Check:
    """One sequence's verify pass: `seq` is committed, its next token is generated position `start`, and `draft`
    is proposed after it (with the draft's distributions `q` in exact mode)."""
    session: Session
    seq: list[int]
    draft: list[int]
    start: int = 0
    sampling: Sampling = GREEDY
    q: list[tuple[list[int], list[float]]] | None = None


@dataclass(frozen=True)
class Guess:
    """One sequence's draft step: the next token after `seq`, which is generated position `position`."""
    session: Session
    seq: list[int]
    position: int
    sampling: Sampling = GREEDY


def verify_checks(lm: LM, checks: list[Check]) -> list[tuple[list[int], int]]:
    """One verify pass over many sequences: for each, the accepted prefix of its draft and the verifier's own next
    token. In greedy and seeded mode the accepted prefix is the one the model agrees with; in exact mode,
    rejection sampling against the draft's distributions. Each session is left holding its sequence and the
    accepted tokens."""
    feeds = [Feed(c.session, c.seq + c.draft, len(c.draft) + 1) for c in checks]
    if all(c.sampling.mode == Mode.GREEDY for c in checks):
        choices, logits = lm.greedy(feeds), [None] * len(checks)
    else:
        choices, logits = [None] * len(checks), lm.logits(feeds)
    out = []
    for c, chosen, scores in zip(checks, choices, logits):
        n = len(c.draft) + 1
        if c.sampling.mode == Mode.EXACT:
            tokens, accepted = c.sampling.verify_exact(scores, c.draft, c.start, c.q)
        else:
            if chosen is None:
                chosen = c.sampling.choose(scores, list(range(c.start, c.start + n)))
            accepted = 0
            while accepted < len(c.draft) and c.draft[accepted] == chosen[accepted]:
                accepted += 1
            tokens = c.draft[:accepted] + [chosen[accepted]]
        c.session.rollback(len(c.seq) + accepted)
        out.append((tokens, accepted))
    return out


def propose_guesses(lm: LM, guesses: list[Guess]) -> list[tuple[int, list[int] | None, list[float] | None]]:
    """Each sequence's next draft token in one pass, with its distribution in exact mode."""
    feeds = [Feed(g.session, g.seq, 1) for g in guesses]
    if all(g.sampling.mode == Mode.GREEDY for g in guesses):
        return [(chosen[0], None, None) for chosen in lm.greedy(feeds)]
    return [g.sampling.propose(scores, g.position) for g, scores in zip(guesses, lm.logits(feeds))]
