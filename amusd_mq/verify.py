"""The verify worker: the only source of committed tokens.

Each step takes the proposals that extend its committed prefix, scores them in one forward pass, and
commits the longest agreeing prefix plus its own next token. With nothing proposed it still steps,
committing one token like plain decoding, so a slow, wrong or absent draft costs little.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from . import protocol as p
from .backend import Session, verify_greedy
from .config import VERIFY
from .policy import Estimates, choose
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
    policy: str = "adaptive"
    proposals: dict[int, int] = field(default_factory=dict)  # position -> token, all of one epoch
    epoch: int = -1
    dead_epoch: int = -1  # proposals of this epoch or older contradict a commit
    done: bool = False
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    last_arrival: float = 0.0
    capped: bool = True  # the last proposal took the draft to its lookahead cap, where it idles

    def release(self) -> None:
        self.done = True
        self.arrived.set()

    def offer(self, epoch: int, pos: int, tokens: list[int]) -> None:
        if epoch <= self.dead_epoch or epoch < self.epoch:
            return
        if epoch > self.epoch:
            self.proposals.clear()
            self.epoch = epoch
        self.proposals.update(enumerate(tokens, start=pos))
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

    def settle(self, start: int, tokens: list[int]) -> None:
        """Forget proposals the commit has passed; one that contradicts it condemns its whole epoch."""
        if any(self.proposals.get(pos, t) != t for pos, t in enumerate(tokens, start=start)):
            self.dead_epoch = self.epoch
            self.proposals.clear()
        else:
            for pos in range(start, start + len(tokens)):
                self.proposals.pop(pos, None)


class VerifyWorker(Worker):
    role = VERIFY

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.handlers[p.Propose] = self.on_propose
        self.estimates = Estimates()

    def register_message(self) -> p.Register:
        msg = super().register_message()
        msg.tokenizer = self.lm.packed_tokenizer()
        return msg

    def new_request(self, msg: p.Assign) -> VerifyRequest:
        seq = Sequence(prompt_ids=msg.prompt_ids, max_new_tokens=msg.max_new_tokens,
                       stop_token_ids=frozenset(msg.stop_token_ids), committed=list(msg.committed))
        return VerifyRequest(rid=msg.req_id, prompt=msg.prompt_ids, seq=seq, lookahead=msg.lookahead,
                             policy=msg.policy)

    async def on_propose(self, msg: p.Propose) -> None:
        r = self.requests.get(msg.req_id)
        if r is None:
            return  # finished or released: a late proposal is harmless
        if any(t >= self.lm.vocab_size for t in msg.token_ids):
            self.rejects.add("invalid_proposal", "proposal with token ids outside the vocabulary")
            return
        now = time.monotonic()
        if len(msg.token_ids) == 1 and not r.capped and now - r.last_arrival < 1.0:
            self.estimates.arrival(now - r.last_arrival)  # one draft step, not a resend or an idle spell
        r.last_arrival = now
        r.capped = msg.pos + len(msg.token_ids) - len(r.seq.committed) >= r.lookahead
        r.offer(msg.epoch, msg.pos, msg.token_ids)

    async def serve(self, r: VerifyRequest) -> None:
        session = self.lm.session()
        while not r.done and not r.seq.done:
            draft = await self._proposals(r)
            started = time.perf_counter()
            tokens, accepted = await self.thread.submit(self._step, session, r.prompt + r.seq.committed, draft)
            self.estimates.step(time.perf_counter() - started, len(draft), accepted)
            if r.done:
                return
            start = len(r.seq.committed)
            tokens, _ = r.seq.verdict(start, tokens, len(draft), accepted)
            r.settle(start, tokens)
            await send(self.dealer, p.Verdict(req_id=r.rid, start=start, token_ids=tokens, proposed=len(draft),
                                              accepted=accepted))

    def _wanted(self, r: VerifyRequest, available: int) -> tuple[int, float]:
        """How many proposals to wait for under the request's policy, and for at most how long."""
        if r.policy == "amusd":  # the original: wait until the draft is 2 ahead (bounded here, not forever)
            return min(2, r.room), self.cfg.heartbeat_expiry_s
        since_last = time.monotonic() - r.last_arrival
        est = self.estimates
        if r.policy == "eager" or not est.draft_alive(since_last):
            return available, 0.0
        wanted = choose(available, r.room, est.alpha, est.t_d, est.t_v, since_last)
        return wanted, 2 * (wanted - available) * est.t_d + 0.002

    async def _proposals(self, r: VerifyRequest) -> list[int]:
        draft = r.take()
        wanted, patience = self._wanted(r, len(draft))
        deadline = time.monotonic() + patience
        while len(draft) < wanted and not r.done:
            r.arrived.clear()
            try:
                await asyncio.wait_for(r.arrived.wait(), deadline - time.monotonic())
            except asyncio.TimeoutError:
                break
            draft = r.take()
        return draft

    def _step(self, session: Session, seq: list[int], draft: list[int]) -> tuple[list[int], int]:
        result = verify_greedy(session, seq, draft)
        if self.cfg.verify_delay_ms:
            time.sleep(self.cfg.verify_delay_ms / 1000)
        return result
