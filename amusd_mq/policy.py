"""When the verifier should start a pass: now with what has been proposed, or after a few more draft tokens.

Verifying k proposals costs about one pass t_v and yields (1 - a^(k+1)) / (1 - a) tokens on average (a:
per-token acceptance). Waiting for one more proposal costs t_d. The verifier picks the k that maximises
expected tokens per unit time. A wrong draft (a near 0) or a slow one (t_d large) makes waiting never pay,
so it steps alone like plain decoding; a good, fast draft makes it wait a few ms right after a rollback
instead of spending a whole pass on one token. The same rule drives the discrete-event ideal.
"""
from __future__ import annotations

DECAY = 0.9


def expected_tokens(alpha: float, k: int) -> float:
    return k + 1 if alpha >= 1 else (1 - alpha ** (k + 1)) / (1 - alpha)


def choose(available: int, cap: int, alpha: float, t_d: float, t_v: float, since_last: float) -> int:
    """How many proposals to verify; more than `available` means wait for them."""
    best_k, best_rate = available, expected_tokens(alpha, available) / t_v
    for k in range(available + 1, cap + 1):
        wait = max(0.0, (k - available) * t_d - since_last)
        rate = expected_tokens(alpha, k) / (t_v + wait)
        if rate > best_rate:
            best_k, best_rate = k, rate
    return best_k


class Estimates:
    """Online estimates of t_v, t_d (seconds) and the per-token acceptance, decayed to follow change."""

    def __init__(self):
        self.t_v: float | None = None
        self.t_d: float | None = None
        self.accepted = 1.0  # a weak prior: alpha = 0.5
        self.rejected = 1.0

    @property
    def alpha(self) -> float:
        return self.accepted / (self.accepted + self.rejected)

    def step(self, seconds: float, proposed: int, accepted: int) -> None:
        self.t_v = seconds if self.t_v is None else DECAY * self.t_v + (1 - DECAY) * seconds
        if proposed:
            self.accepted = DECAY * self.accepted + accepted
            self.rejected = DECAY * self.rejected + (accepted < proposed)

    def arrival(self, seconds_per_token: float) -> None:
        self.t_d = seconds_per_token if self.t_d is None else DECAY * self.t_d + (1 - DECAY) * seconds_per_token

    def draft_alive(self, since_last: float) -> bool:
        return self.t_d is not None and self.t_v is not None and since_last < max(5 * self.t_v, 20 * self.t_d)
