"""The verify worker: the only source of committed tokens.

Each step takes the proposals that extend its committed prefix, scores them in one forward pass, and
commits the longest agreeing prefix plus its own next token. With nothing proposed it still steps,
committing one token like plain decoding, so a slow, wrong or absent draft costs little.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field

from . import protocol as p
from .config import VERIFY
from .runtime.lm import Session, verify
from .sampling import GREEDY, Sampling, proposal_problem, sampling_of
from .sequence import Sequence
from .transport import send
from .worker import Worker

log = logging.getLogger(__name__)


@dataclass
class VerifyRequest:
    rid: str
    prompt: list[int]
    seq: Sequence  # the committed tokens and the termination rules, shared with the coordinator's logic
    lookahead: int
    policy: str = "eager"
    sampling: Sampling = GREEDY
    proposals: dict[int, int] = field(default_factory=dict)  # position -> token, all of one epoch
    dists: dict[int, tuple[list[int], list[float]]] = field(default_factory=dict)  # exact mode: position -> q
    epoch: int = -1
    assigned: int = 0  # the epoch of the Assign that started it; a resend comes with a newer one
    dead_epoch: int = -1  # proposals of this epoch or older contradict a commit
    done: bool = False
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    def release(self) -> None:
        self.done = True
        self.arrived.set()

    async def wait(self, timeout_s: float) -> bool:
        """Until a proposal arrives or the request is released: False if timeout_s passes first."""
        self.arrived.clear()
        try:
            await asyncio.wait_for(self.arrived.wait(), timeout_s)
        except asyncio.TimeoutError:
            return False
        return True

    def offer(self, epoch: int, pos: int, tokens: list[int], q_ids=(), q_probs=()) -> None:
        if epoch <= self.dead_epoch or epoch < self.epoch:
            return
        if epoch > self.epoch:
            self.proposals.clear()
            self.dists.clear()
            self.epoch = epoch
        self.proposals.update(enumerate(tokens, start=pos))
        self.dists.update(enumerate(zip(q_ids, q_probs), start=pos))
        self.arrived.set()

    @property
    def room(self) -> int:
        """Proposals a pass may check, leaving room for the verifier's own token."""
        return min(self.lookahead, self.seq.max_new_tokens - len(self.seq.committed) - 1)

    def take(self) -> list[int]:
        """The proposals that extend the committed prefix, leaving room for the verifier's own token."""
        n = len(self.seq.committed)
        draft = []
        while len(draft) < self.room and n + len(draft) in self.proposals:
            draft.append(self.proposals[n + len(draft)])
        return draft

    def dists_of(self, draft: list[int]) -> list[tuple[list[int], list[float]]] | None:
        n = len(self.seq.committed)
        return [self.dists[n + i] for i in range(len(draft))] if self.sampling.mode == "exact" else None

    def settle(self, start: int, tokens: list[int]) -> None:
        """Forget proposals the commit has passed; one that contradicts it condemns its whole epoch."""
        if any(self.proposals.get(pos, t) != t for pos, t in enumerate(tokens, start=start)):
            self.dead_epoch = self.epoch
            self.proposals.clear()
            self.dists.clear()
        else:
            for pos in range(start, start + len(tokens)):
                self.proposals.pop(pos, None)
                self.dists.pop(pos, None)


class VerifyWorker(Worker):
    role = VERIFY

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.handlers[p.Propose] = self.on_propose

    def new_request(self, msg: p.Assign) -> VerifyRequest:
        seq = Sequence(prompt_ids=msg.prompt_ids, max_new_tokens=msg.max_new_tokens,
                       stop_token_ids=frozenset(msg.stop_token_ids), committed=list(msg.committed))
        return VerifyRequest(rid=msg.req_id, prompt=msg.prompt_ids, seq=seq, lookahead=msg.lookahead,
                             policy=msg.policy, epoch=msg.epoch, assigned=msg.epoch, sampling=sampling_of(msg))

    async def on_propose(self, msg: p.Propose) -> None:
        r = self.requests.get(msg.req_id)
        if r is None:
            return  # finished or released: a late proposal is harmless
        problem = proposal_problem(r.sampling.mode, msg.token_ids, msg.q_ids, msg.q_probs, self.lm.vocab_size)
        if problem:
            self.rejects.add("invalid_proposal", f"proposal refused: {problem}")
            return
        r.offer(msg.epoch, msg.pos, msg.token_ids, msg.q_ids, msg.q_probs)

    async def serve(self, r: VerifyRequest) -> None:
        last = None
        with self.lm.session() as session:
            while not r.done and not r.seq.done:
                draft = r.take() if r.policy == "eager" else await self._wait_for_two(r)
                tokens, accepted, step_ms = await self.thread.submit(
                    self._step, session, r.prompt + r.seq.committed, draft, len(r.seq.committed), r.sampling,
                    r.dists_of(draft))
                if r.done:
                    return
                start = len(r.seq.committed)
                tokens, _ = r.seq.verdict(start, tokens, len(draft), accepted)
                r.settle(start, tokens)
                last = p.Verdict(req_id=r.rid, start=start, token_ids=tokens, proposed=len(draft),
                                 accepted=accepted, epoch=r.epoch, step_ms=step_ms)
                await send(self.dealer, last)
        # Nothing follows the last verdict, so its loss would go unnoticed: repeat it until released.
        while last is not None and r.seq.done and not r.done:
            if not await r.wait(self.cfg.heartbeat_s):
                await send(self.dealer, last)

    async def _wait_for_two(self, r: VerifyRequest) -> list[int]:
        """The original AMUSD verifier waits until the draft is 2 ahead. Kept for comparison only (the
        benchmark's amusd-policy); unlike the original it gives up after a heartbeat expiry, so a dead draft
        can't stall it forever."""
        draft = r.take()
        deadline = time.monotonic() + self.cfg.heartbeat_expiry_s
        while len(draft) < min(2, r.room) and not r.done:
            if not await r.wait(deadline - time.monotonic()):
                break
            draft = r.take()
        return draft

    def _step(self, session: Session, seq: list[int], draft: list[int], pos: int, sampling: Sampling,
              q) -> tuple[list[int], int, float]:
        start = time.perf_counter()
        tokens, accepted = verify(session, seq, draft, pos, sampling, q)
        if self.cfg.verify_delay_ms:
            time.sleep(self.cfg.verify_delay_ms / 1000)
        if self.cfg.verify_hang_after and self.thread.done >= self.cfg.verify_hang_after:
            threading.Event().wait()
        return tokens, accepted, (time.perf_counter() - start) * 1000
