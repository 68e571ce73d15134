"""The canonical sequence of one request: commits, proposals, epochs, rollback points and termination.

Pure bookkeeping, no I/O and no clock: the coordinator feeds it proposals and verdicts, each with the time it
handles them at, and publishes what it returns; its timings are all on that one clock.
Proposals only ever affect speed: a committed token always comes from a verdict. The epoch numbers the
canonical prefix a draft may build on; it is bumped whenever the draft's path is found to diverge from
the canonical one (a rollback point), so proposals still in flight from the old path are dropped.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Stats:
    verify_steps: int = 0
    verify_rows: int = 0  # requests in those steps' passes, this one included
    proposed: int = 0  # draft tokens the verifier checked
    accepted: int = 0  # of those, the ones it agreed with
    draft_tokens: int = 0  # draft tokens that reached the coordinator
    stale: int = 0  # of those, dropped for an old epoch
    rollbacks: int = 0
    verify_busy_s: float = 0.0  # time in verify forward passes after the first token
    # Where the decode time goes, on the coordinator's one clock (bench reports these against the ideal):
    verify_gaps_s: float = 0.0  # between consecutive verdicts, beyond the forward pass: the verifier's turnaround
    draft_intervals: int = 0
    draft_interval_s: float = 0.0  # between consecutive proposed tokens of one epoch: the draft's effective step
    restarts: int = 0
    restart_s: float = 0.0  # from a rollback to the first proposal of the new epoch


@dataclass
class Sequence:
    prompt_ids: list[int]
    max_new_tokens: int
    stop_token_ids: frozenset[int]
    committed: list[int] = field(default_factory=list)
    epoch: int = 0
    pending: list[int] = field(default_factory=list)  # forwarded proposals past the committed end
    finish_reason: str | None = None
    stats: Stats = field(default_factory=Stats)
    created: float = field(kw_only=True)
    started: float | None = None
    first_token: float | None = None
    finished: float | None = None
    last_verdict: float | None = None
    last_proposal: tuple[int, float] | None = None  # (epoch, arrival) of the latest live proposal
    rolled_back: float | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def propose(self, epoch: int, pos: int, tokens: list[int], now: float) -> tuple[int, list[int], bool]:
        """Take a draft proposal. Returns (start, tokens to forward to the verifier, rollback?)."""
        self.stats.draft_tokens += len(tokens)
        if self.done or epoch != self.epoch:
            self.stats.stale += len(tokens)
            return pos, [], False
        self._time_proposal(epoch, len(tokens), now)
        n = len(self.committed)
        end = n + len(self.pending)
        known = self.committed + self.pending
        fresh: list[int] = []
        for p, token in enumerate(tokens, start=pos):
            if p < end:
                if known[p] != token:  # the draft's path left the canonical one
                    return self._rollback(pos, now)
            elif p == end + len(fresh):
                fresh.append(token)
            else:  # a gap: a proposal was lost, so the draft must resend from the committed end
                return self._rollback(pos, now)
        self.pending.extend(fresh)
        return end, fresh, False

    def _time_proposal(self, epoch: int, n: int, now: float) -> None:
        if self.rolled_back is not None:
            self.stats.restarts += 1
            self.stats.restart_s += now - self.rolled_back
            self.rolled_back = None
        elif self.last_proposal is not None and self.last_proposal[0] == epoch:
            self.stats.draft_intervals += n
            self.stats.draft_interval_s += now - self.last_proposal[1]
        self.last_proposal = (epoch, now)

    def resync(self) -> None:
        """A new verifier joins: what was forwarded to the old one must be proposed again, under a new epoch."""
        self.epoch += 1
        self.pending.clear()

    def _rollback(self, pos: int, now: float) -> tuple[int, list[int], bool]:
        self.epoch += 1
        self.pending.clear()
        self.stats.rollbacks += 1
        self.rolled_back = now
        return pos, [], True

    def verdict(self, start: int, tokens: list[int], proposed: int, accepted: int, now: float,
                step_s: float = 0.0, rows: int = 1) -> tuple[list[int], bool] | None:
        """Apply a verdict. Returns (tokens committed, rollback?), or None for a stale or duplicate one."""
        if self.done or start != len(self.committed) or not tokens:
            return None
        tokens = self._terminate(tokens)
        self.stats.verify_steps += 1
        self.stats.verify_rows += rows
        self.stats.proposed += proposed
        self.stats.accepted += accepted
        if self.first_token is None:
            self.first_token = now
        else:
            self.stats.verify_busy_s += step_s
            self.stats.verify_gaps_s += max(0.0, now - self.last_verdict - step_s)
        self.last_verdict = now
        self.committed.extend(tokens)
        overlap = min(len(tokens), len(self.pending))
        rollback = self.pending[:overlap] != tokens[:overlap]
        if rollback:
            self.epoch += 1
            self.pending.clear()
            self.stats.rollbacks += 1
            self.rolled_back = now
        else:
            del self.pending[:overlap]
        if self.done:
            self.finished = now
        return tokens, rollback

    def _terminate(self, tokens: list[int]) -> list[int]:
        """Cut at the first stop token (kept, as generate() keeps EOS) or at max_new_tokens."""
        for i, token in enumerate(tokens):
            if token in self.stop_token_ids:
                self.finish_reason = "stop"
                tokens = tokens[: i + 1]
                break
        room = self.max_new_tokens - len(self.committed)
        if len(tokens) >= room:
            if len(tokens) > room or self.finish_reason is None:
                self.finish_reason = "length"
            tokens = tokens[:room]
        return tokens

    def stop_at(self, length: int, now: float) -> None:
        """End at a stop string found in the committed text: the tokens after the one completing it are dropped."""
        del self.committed[length:]
        self.finish_reason = "stop"
        if self.finished is None:
            self.finished = now

    def cancel(self, reason: str, now: float) -> None:
        if not self.done:
            self.finish_reason = reason
            self.finished = now

    def summary(self, now: float) -> dict[str, int | float]:
        s = self.stats
        end = self.finished if self.finished is not None else now
        start = self.started if self.started is not None else self.created
        elapsed = end - start
        n = len(self.committed)
        decode_s = end - self.first_token if self.first_token is not None else 0.0
        return {
            "new_tokens": n, "verify_steps": s.verify_steps, "proposed": s.proposed, "accepted": s.accepted,
            "acceptance_rate": s.accepted / s.proposed if s.proposed else 0.0,
            "tokens_per_verify_step": n / s.verify_steps if s.verify_steps else 0.0,
            "verify_batch": s.verify_rows / s.verify_steps if s.verify_steps else 0.0,
            "draft_steps": s.draft_tokens, "stale_proposals": s.stale, "rollbacks": s.rollbacks,
            "queue_s": start - self.created,
            "ttft_s": (self.first_token if self.first_token is not None else end) - start, "elapsed_s": elapsed,
            "tokens_per_s": n / elapsed if elapsed > 0 else 0.0,
            "decode_tokens_per_s": (n - 1) / decode_s if n > 1 and decode_s > 0 else 0.0,
            "verify_busy": s.verify_busy_s / decode_s if decode_s > 0 else 0.0,
            "verify_step_ms": _mean_ms(s.verify_busy_s, s.verify_steps - 1),
            "verify_gap_ms": _mean_ms(s.verify_gaps_s, s.verify_steps - 1),
            "draft_step_ms": _mean_ms(s.draft_interval_s, s.draft_intervals),
            "restart_ms": _mean_ms(s.restart_s, s.restarts),
        }


def _mean_ms(total_s: float, n: int) -> float:
    return 1000 * total_s / n if n > 0 else 0.0
