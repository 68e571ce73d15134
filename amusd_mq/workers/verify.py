"""The verify worker: the only source of committed tokens.

Each pass takes every active request's proposals that extend its committed prefix, scores them all in one
batched forward pass, and commits, per request, the longest agreeing prefix plus its own next token. A
request with nothing proposed still advances by one token in the same pass, like plain decoding, so a slow,
wrong or absent draft costs little. How many proposals a pass checks per request follows the load
(amusd_mq.workers.speculation), and each verdict tells the draft how far to run ahead.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field

from ..config import VERIFY
from ..runtime.lm import Check, Session, verify_checks
from ..sampling import GREEDY, Sampling, proposal_problem, sampling_of
from ..sequence import Sequence
from ..wire import protocol as p
from ..wire.codes import Code, Mode, Policy
from ..wire.transport import send, send_all
from .speculation import Acceptance, CostModel, Switch, best_depth
from .step import Plan, Served, Worker

log = logging.getLogger(__name__)
CALIBRATION = ((1, 1), (1, 8), (4, 8))  # (rows, tokens per row) of the passes timed before serving


@dataclass
class VerifyRequest(Served):
    seq: Sequence  # the committed tokens and the termination rules, shared with the coordinator's logic
    lookahead: int  # the request's cap
    policy: str = Policy.EAGER
    sampling: Sampling = GREEDY
    acceptance: Acceptance = field(default_factory=lambda: Acceptance(0.5))
    proposals: dict[int, int] = field(default_factory=dict)  # position -> token, all of one epoch
    dists: dict[int, tuple[list[int], list[float]]] = field(default_factory=dict)  # exact mode: position -> q
    epoch: int = -1
    dead_epoch: int = -1  # proposals of this epoch or older contradict a commit
    waiting_since: float | None = None  # the amusd policy: when it began waiting for two proposals
    last: p.Verdict | None = None  # the latest verdict sent
    finished_at: float | None = None  # when the final verdict was first sent

    def offer(self, epoch: int, pos: int, tokens: list[int], q_ids=(), q_probs=()) -> None:
        if epoch <= self.dead_epoch or epoch < self.epoch:
            return
        if epoch > self.epoch:
            self.proposals.clear()
            self.dists.clear()
            self.epoch = epoch
        self.proposals.update(enumerate(tokens, start=pos))
        self.dists.update(enumerate(zip(q_ids, q_probs), start=pos))

    @property
    def room(self) -> int:
        """Proposals a pass may check, leaving room for the verifier's own token."""
        return min(self.lookahead, self.seq.max_new_tokens - len(self.seq.committed) - 1)

    def take(self, depth: int | None = None) -> list[int]:
        """The proposals that extend the committed prefix, at most `depth` of them and leaving room for the
        verifier's own token."""
        n = len(self.seq.committed)
        limit = self.room if depth is None else min(depth, self.room)
        draft = []
        while len(draft) < limit and n + len(draft) in self.proposals:
            draft.append(self.proposals[n + len(draft)])
        return draft

    def ready(self, now: float, patience_s: float) -> bool:
        """Whether it joins the next pass. The original AMUSD verifier (the amusd policy, kept for benchmarks)
        waits until the draft is 2 ahead; unlike the original it gives up after patience_s, so a dead draft
        can't stall it forever."""
        if self.policy == Policy.EAGER or len(self.take()) >= min(2, self.room):
            return True
        if self.waiting_since is None:
            self.waiting_since = now
        return now - self.waiting_since >= patience_s

    def dists_of(self, draft: list[int]) -> list[tuple[list[int], list[float]]] | None:
        n = len(self.seq.committed)
        return [self.dists[n + i] for i in range(len(draft))] if self.sampling.mode == Mode.EXACT else None

    def score(self, start: int, draft: list[int], accepted: int, tokens: list[int]) -> tuple[int, int]:
        """Guesses accepted and judged by this verdict: the checked ones up to the first rejection, and the
        guess standing unchecked where the verifier chose its own token, which the choice judges for free
        (so acceptance is still measured while no guesses are checked)."""
        hits, trials = accepted, accepted + (accepted < len(draft))
        bonus = start + accepted
        if accepted == len(draft) and len(tokens) > accepted and bonus in self.proposals:
            hits += self.proposals[bonus] == tokens[accepted]
            trials += 1
        return hits, trials

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


@dataclass(frozen=True)
class VerifyStep:
    request: VerifyRequest
    check: Check  # copied when the pass was built: proposals keep arriving during it


@dataclass(frozen=True)
class VerifyPlan(Plan):
    steps: list[VerifyStep]
    built_at: float  # when it took its requests: the switch measures a pass from here to its verdicts sent
    reach: int  # how far the drafts may run ahead, told with the verdicts (eager requests)


class VerifyWorker(Worker):
    role = VERIFY

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.handlers[p.Propose] = self.on_propose
        self.acceptance = Acceptance(0.5)  # all requests': where a new request's estimate starts
        self.cost: CostModel | None = None
        self.switch = Switch()
        self.depth = 0  # guesses per request the cost line last chose; a prefill keeps the one before it

    async def prepare(self) -> None:
        log.info("timing verify passes of %s (rows, tokens per row) to plan batches", list(CALIBRATION))
        sizes = [(rows, width) for rows, width in CALIBRATION if rows <= self.cfg.max_batch]
        times = await self.thread.submit(lambda: [self.lm.time_pass(rows, width) for rows, width in sizes])
        self.cost = CostModel([(rows * width, ms) for (rows, width), ms in zip(sizes, times)])
        log.info("a verify pass costs %.2f ms plus %.3f ms per token", self.cost.base, self.cost.per_token)

    def new_request(self, msg: p.Assign, session: Session) -> VerifyRequest:
        seq = Sequence(prompt_ids=msg.prompt_ids, max_new_tokens=msg.max_new_tokens,
                       stop_token_ids=frozenset(msg.stop_token_ids), committed=list(msg.committed),
                       created=time.monotonic())
        return VerifyRequest(rid=msg.req_id, prompt=msg.prompt_ids, seq=seq, lookahead=msg.lookahead, session=session,
                             policy=msg.policy, epoch=msg.epoch, assigned=msg.epoch, sampling=sampling_of(msg),
                             acceptance=Acceptance(self.acceptance.rate))

    def extra_tasks(self):
        return [self._repeat_final_verdicts()]

    async def on_propose(self, msg: p.Propose) -> None:
        r = self.requests.get(msg.req_id)
        if r is None:
            return  # finished or released: a late proposal is harmless
        problem = proposal_problem(r.sampling.mode, msg.token_ids, msg.q_ids, msg.q_probs, self.lm.vocab_size)
        if problem:
            self.rejects.add(Code.INVALID_PROPOSAL, f"proposal refused: {problem}")
            return
        r.offer(msg.epoch, msg.pos, msg.token_ids, msg.q_ids, msg.q_probs)
        self.work.set()

    def build(self) -> VerifyPlan | None:
        now = time.monotonic()
        live = [r for r in self.requests.values() if not r.seq.done and r.ready(now, self.expiry_s)]
        batch, prefill = self.take_turns(live)
        if not batch:
            return None
        eager = [r for r in batch if r.policy == Policy.EAGER]
        if eager and not prefill:
            self.depth = (best_depth([r.acceptance.rate for r in eager], self.cost, max(r.lookahead for r in eager))
                          if self.switch.speculating else 0)
        steps = []
        for r in batch:
            draft = r.take(self.depth if r.policy == Policy.EAGER else None)
            steps.append(VerifyStep(r, Check(r.session, r.prompt + r.seq.committed, draft, len(r.seq.committed),
                                             r.sampling, r.dists_of(draft))))
        # One guess even at depth 0, so that acceptance is still measured, unless speculation is switched off.
        reach = max(self.depth, 1) if self.switch.speculating else 0
        return VerifyPlan(steps, prefill, now, reach)

    def patience(self) -> float | None:
        """While an amusd-policy request waits for proposals, the loop looks again a few times a heartbeat."""
        waiting = any(not r.seq.done and r.policy != Policy.EAGER for r in self.requests.values())
        return self.heartbeat_s / 4 if waiting else None

    def compute(self, plan: VerifyPlan) -> tuple[list[tuple[list[int], int]], float]:
        start = time.perf_counter()
        self.inject_failure([step.check.seq for step in plan.steps])
        out = verify_checks(self.lm, [step.check for step in plan.steps])
        if self.cfg.verify_delay_ms:
            time.sleep(self.cfg.verify_delay_ms / 1000)
        if self.cfg.verify_hang_after and self.thread.passes >= self.cfg.verify_hang_after:
            threading.Event().wait()
        return out, (time.perf_counter() - start) * 1000

    async def finish(self, plan: VerifyPlan, outcome) -> None:
        results, step_ms = outcome
        now = time.monotonic()
        committed, verdicts = 0, []
        for step, (tokens, accepted) in zip(plan.steps, results):
            r, draft = step.request, step.check.draft
            if r.done:
                continue  # released during the pass
            r.waiting_since = None
            start = len(r.seq.committed)
            tokens, _ = r.seq.verdict(start, tokens, len(draft), accepted, now)
            hits, trials = r.score(start, draft, accepted, tokens)
            r.acceptance.observe(hits, trials)
            self.acceptance.observe(hits, trials)
            r.settle(start, tokens)
            committed += len(tokens)
            reach = r.lookahead if r.policy != Policy.EAGER else min(r.lookahead, plan.reach)
            r.last = p.Verdict(req_id=r.rid, start=start, token_ids=tokens, proposed=len(draft), accepted=accepted,
                               epoch=r.epoch, lookahead=reach, rows=len(plan.steps), step_ms=step_ms)
            if r.seq.done:
                r.finished_at = now
            verdicts.append(r.last)
        await send_all(self.dealer, verdicts, self.cfg.max_message_bytes)
        if not plan.prefill:
            self._measure(plan, step_ms, committed)

    def _measure(self, plan: VerifyPlan, step_ms: float, committed: int) -> None:
        """A step (not a prefill) teaches the cost line its forward pass's time, and the switch the tokens it
        committed in its time from taking its requests to having sent its verdicts."""
        self.cost.observe(len(plan.steps) * (max(len(step.check.draft) for step in plan.steps) + 1), step_ms)
        was = self.switch.speculating
        self.switch.observe(committed, time.monotonic() - plan.built_at)
        if self.switch.speculating != was:
            log.info("speculation %s%s (tokens/s measured: %s)", "on" if self.switch.speculating else "off",
                     " to measure it again" if self.switch.trying else "",
                     ", ".join(f"{'on' if k else 'off'} {v[0]:.0f}" for k, v in self.switch.rates.items()))

    async def _repeat_final_verdicts(self) -> None:
        """Nothing follows a request's last verdict, so its loss would go unnoticed: it is sent again every
        heartbeat until the coordinator releases the request."""
        while True:
            await asyncio.sleep(self.heartbeat_s)
            now = time.monotonic()
            for r in list(self.requests.values()):
                if r.finished_at is not None and now - r.finished_at >= self.heartbeat_s:
                    await send(self.dealer, r.last)
