"""The draft worker: runs ahead of the verifier, one token per request per pass, each request as far ahead
as its verifier last asked (never past the request's lookahead cap), all its requests in one batched pass.

It learns the canonical sequence from the coordinator's PUB stream (Clone pattern: sequence numbers, a
Snapshot request on any gap) and, when a commit contradicts its guesses, drops them and continues from
the committed tokens; its KV cache rolls back to the first guess dropped.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field

import zmq

from ..config import DRAFT, pub_url
from ..runtime.lm import Guess, Session, propose_guesses
from ..sampling import GREEDY, Sampling, sampling_of
from ..wire import protocol as p
from ..wire.codes import Mode
from ..wire.security import secure
from ..wire.transport import make_socket, send, send_all
from .step import Plan, Served, Worker

log = logging.getLogger(__name__)


@dataclass
class DraftRequest(Served):
    committed: list[int]
    epoch: int
    lookahead: int  # how far ahead to run: what its verifier last asked for, within the request's cap
    max_new_tokens: int
    stop: frozenset[int]
    sampling: Sampling = GREEDY
    guess: list[int] = field(default_factory=list)  # committed tokens followed by this draft's own guesses
    dists: dict[int, tuple[list[int], list[float]]] = field(default_factory=dict)  # exact mode: each guess's q
    revision: int = 0  # bumped whenever guesses are thrown away
    cut: int | None = None  # the first guess thrown away since the last step: where the KV cache rolls back to
    behind: bool = False  # a gap in the commits it has seen: it waits for a snapshot before guessing again

    def idle(self, max_context: int) -> bool:
        ahead = self.guess[len(self.committed):]
        return (self.behind or len(ahead) >= self.lookahead or len(self.guess) >= self.max_new_tokens
                or len(self.prompt) + len(self.guess) >= max_context or any(t in self.stop for t in ahead))

    def adopt(self, start: int, tokens: list[int]) -> bool:
        """Merge canonical tokens committed at `start`. False when some were missed (a gap)."""
        self.behind = start > len(self.committed)
        if self.behind:
            return False
        self.committed.extend(tokens[len(self.committed) - start:])
        n = min(len(self.guess), len(self.committed))
        diverged = next((i for i in range(n) if self.guess[i] != self.committed[i]), None)
        if diverged is not None:
            del self.guess[diverged:]
            self.revision += 1
            self.cut = diverged if self.cut is None else min(self.cut, diverged)
        self.guess.extend(self.committed[len(self.guess):])
        return True


@dataclass(frozen=True)
class DraftStep:
    """A request's part of a pass, copied on the event loop: commits change the request during the pass."""
    request: DraftRequest
    revision: int  # the request's when taken: a commit that throws guesses away makes this step's guess stale
    guess: Guess  # the next guess to make
    valid: int  # how much of its KV cache is still valid: the pass rolls it back to here first


@dataclass(frozen=True)
class DraftPlan(Plan):
    steps: list[DraftStep]


class DraftWorker(Worker):
    role = DRAFT

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.handlers[p.Snapshot] = self.on_snapshot
        self.published = {p.Beat: self.on_beat, p.Commit: self.on_commit}
        self.sub = None
        self.last_seq: int | None = None

    async def on_registered(self) -> None:
        self.last_seq = self.registered_seq
        self.sub = make_socket(self.ctx, zmq.SUB, self.cfg.max_message_bytes)
        secure(self.sub, self.keys)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.sub.connect(pub_url(self.cfg.coordinator_url))

    def on_disconnected(self) -> None:
        if self.sub is not None:
            self.sub.close()
            self.sub = None

    def extra_tasks(self) -> list[Coroutine]:
        return [self._sub_loop()]

    def new_request(self, msg: p.Assign, session: Session) -> DraftRequest:
        r = DraftRequest(rid=msg.req_id, prompt=msg.prompt_ids, committed=[], epoch=msg.epoch, assigned=msg.epoch,
                         lookahead=msg.lookahead, max_new_tokens=msg.max_new_tokens, stop=frozenset(msg.stop_token_ids),
                         session=session, sampling=sampling_of(msg))
        r.adopt(0, msg.committed)
        return r

    async def _sub_loop(self) -> None:
        while True:
            await self.dispatch(await self._recv(self.sub), self.published, "a draft's subscription")

    async def on_beat(self, msg: p.Beat) -> None:
        # The last update before this beat was lost, or a snapshot asked for after a gap was.
        if msg.seq > self.last_seq or any(r.behind for r in self.requests.values()):
            await self._resync()

    async def on_commit(self, msg: p.Commit) -> None:
        gap = msg.seq > self.last_seq + 1
        self.last_seq = max(self.last_seq, msg.seq)
        r = self.requests.get(msg.req_id)
        if r is not None:
            r.lookahead = msg.lookahead
            await self._apply(r, msg.epoch, msg.start, msg.token_ids, msg.done)
        if gap:
            await self._resync()

    async def _resync(self) -> None:
        for rid in list(self.requests):
            await send(self.dealer, p.SnapshotRequest(req_id=rid))

    async def on_snapshot(self, msg: p.Snapshot) -> None:
        self.last_seq = max(self.last_seq, msg.seq)
        r = self.requests.get(msg.req_id)
        if r is not None and len(msg.committed) >= len(r.committed):
            await self._apply(r, msg.epoch, 0, msg.committed, msg.done)

    async def _apply(self, r: DraftRequest, epoch: int, start: int, tokens: list[int], done: bool) -> None:
        if done:
            self._drop(r.rid)
            return
        self.work.set()
        if not r.adopt(start, tokens):
            await send(self.dealer, p.SnapshotRequest(req_id=r.rid))
            return
        if epoch > r.epoch:
            # A rollback point: guesses still standing were dropped by the coordinator, so send them again.
            r.epoch = epoch
            n = len(r.committed)
            if len(r.guess) > n:
                await send(self.dealer, self._proposal(r, n, len(r.guess)))

    def build(self) -> DraftPlan | None:
        """A step for each request with room ahead."""
        live = [r for r in self.requests.values() if not r.idle(self.lm.max_context)]
        batch, prefill = self.take_turns(live)
        if not batch:
            return None
        steps = []
        for r in batch:
            pos = len(r.guess)
            cut, r.cut = r.cut, None
            steps.append(DraftStep(r, r.revision, Guess(r.session, r.prompt + r.guess, pos, r.sampling),
                                   len(r.prompt) + (pos if cut is None else cut)))
        return DraftPlan(steps, prefill)

    def compute(self, plan: DraftPlan) -> list[tuple[int, list | None, list | None]]:
        self.inject_failure([step.guess.seq for step in plan.steps])
        for step in plan.steps:
            step.request.session.rollback(step.valid)
        out = propose_guesses(self.lm, [step.guess for step in plan.steps])
        if self.cfg.draft_delay_ms:
            time.sleep(self.cfg.draft_delay_ms / 1000)
        if self.cfg.draft_wrong:
            out = [((token + 1) % self.lm.vocab_size, ids, probs) if ids is None else (token, ids, probs)
                   for token, ids, probs in out]
        return out

    async def finish(self, plan: DraftPlan, outcome) -> None:
        proposals = []
        for step, (token, ids, probs) in zip(plan.steps, outcome):
            r, pos = step.request, step.guess.position
            if r.done or r.revision != step.revision or len(r.guess) != pos:
                continue  # a commit overtook this step
            r.guess.append(token)
            if ids is not None:
                r.dists[pos] = (ids, probs)
            proposals.append(self._proposal(r, pos, pos + 1))
        await send_all(self.dealer, proposals, self.cfg.max_message_bytes)

    @staticmethod
    def _proposal(r: DraftRequest, start: int, end: int) -> p.Propose:
        """The guesses at positions [start, end), with their distributions in exact mode."""
        dists = [r.dists[i] for i in range(start, end)] if r.sampling.mode == Mode.EXACT else []
        return p.Propose(req_id=r.rid, epoch=r.epoch, pos=start, token_ids=r.guess[start:end],
                         q_ids=[d[0] for d in dists], q_probs=[d[1] for d in dists])
