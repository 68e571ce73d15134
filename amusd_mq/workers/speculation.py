"""How far speculation should reach at the current load: the verifier's choice, each pass, of how many draft
tokens it checks per request.

A batched pass pads every row to the widest, so the pass costs what its rows x width costs, whoever uses the
width. Checking k proposals of a request whose guesses are accepted with probability a commits, in
expectation, (1 - a^(k+1)) / (1 - a) tokens (Leviathan et al.). The verifier picks the k that maximises the
expected tokens committed by all its requests per millisecond of the pass: wide where a pass costs about the
same whatever its width (a GPU at small batch), narrow where each token costs (a CPU, or a GPU at large
batch), and 0, plain batched decoding, where guesses don't pay for the tokens they take. The cost comes from a
line fitted to the verifier's own passes, and each request's acceptance from its own verdicts, starting from
what the worker's other requests have seen.

What a pass costs is not all that speculation costs: the draft's messages pass through the coordinator, and
where draft and verifier share cores (one CPU, or one card without MPS) the draft's passes slow the
verifier's. So above the depth sits a switch, decided by what each choice has delivered: tokens committed
per second of the verifier's wall clock, measured over windows of passes with the draft on and with it off,
the better one kept and the other tried again now and then.
"""
from __future__ import annotations

from collections import deque

WINDOW, WINDOW_S = 16, 0.5  # the switch measures at least this many passes and this many seconds at a time
SETTLE = 4  # passes at the start of a window it doesn't count: after a switch the draft is still catching up
RETRY, MAX_RETRY = 16, 256  # windows after which the choice not in use is measured (again); doubled each time it
# loses again, so a clear winner is rarely interrupted
PRIOR_WEIGHT = 4.0  # a new request's acceptance counts as this many guesses at the worker's rate
DECAY = 0.97  # per guess: acceptance follows the text being written, not its whole history


class CostModel:
    """A verify pass's milliseconds against the tokens it computes (rows x padded width): a least-squares line
    through a calibration made at warm-up, which keeps the slope defined when every pass has the same size,
    and the latest passes, which follow the machine as it is loaded."""

    def __init__(self, calibration: list[tuple[int, float]], window: int = 64):
        if len({tokens for tokens, _ in calibration}) < 2:
            raise ValueError("calibrate at two sizes at least")
        self.calibration = calibration
        self.recent: deque[tuple[int, float]] = deque(maxlen=window)
        self.base, self.per_token = self._fit()

    def observe(self, tokens: int, ms: float) -> None:
        self.recent.append((tokens, ms))
        self.base, self.per_token = self._fit()

    def predict(self, tokens: int) -> float:
        return self.base + self.per_token * tokens

    def _fit(self) -> tuple[float, float]:
        points = self.calibration + list(self.recent)
        n = len(points)
        mx = sum(x for x, _ in points) / n
        my = sum(y for _, y in points) / n
        sxx = sum((x - mx) ** 2 for x, _ in points)
        slope = max(0.0, sum((x - mx) * (y - my) for x, y in points) / sxx) if sxx else 0.0
        base = max(my - slope * mx, 1e-6)  # a pass is never free: the ratio below stays finite
        return base, slope


def expected_tokens(acceptance: float, k: int) -> float:
    """Tokens one pass commits for a request when it checks k guesses, each accepted with this probability."""
    if acceptance >= 1.0:
        return k + 1.0
    return (1 - acceptance ** (k + 1)) / (1 - acceptance)


def best_depth(acceptances: list[float], cost: CostModel, cap: int) -> int:
    """The guesses per request, 0 to cap, that commit the most tokens per millisecond of a pass over all rows."""
    rows = len(acceptances)

    def rate(k: int) -> float:
        return sum(expected_tokens(a, k) for a in acceptances) / cost.predict(rows * (k + 1))

    return max(range(cap + 1), key=rate) if rows else cap


class Acceptance:
    """How often one request's guesses are accepted: decayed counts, starting from a shared prior."""

    def __init__(self, prior: float):
        self.hits = PRIOR_WEIGHT * prior
        self.trials = PRIOR_WEIGHT

    @property
    def rate(self) -> float:
        return self.hits / self.trials

    def observe(self, hits: int, trials: int) -> None:
        decay = DECAY ** trials
        self.hits = self.hits * decay + hits
        self.trials = self.trials * decay + trials


class Switch:
    """Whether to speculate at all: the choice that has committed more tokens per second (an average over its
    windows that halves the weight of the older ones at each). It starts speculating, and first measures the
    other choice after RETRY windows."""

    def __init__(self):
        self.speculating = True
        self.rates: dict[bool, tuple[float, int]] = {}  # choice -> (tokens per second, window it was last measured)
        self.retry = RETRY
        self.trying = False  # whether the window just measured was a retry of the choice not in use
        self.windows = 0
        self.passes = self.tokens = 0
        self.seconds = 0.0

    def observe(self, tokens: int, seconds: float) -> None:
        """A pass's committed tokens and its wall time, from taking its requests to having sent its verdicts."""
        self.passes += 1
        if self.passes > SETTLE:
            self.tokens += tokens
            self.seconds += seconds
        if self.passes < WINDOW or self.seconds < WINDOW_S:
            return
        self.windows += 1
        rate = self.tokens / self.seconds
        if self.speculating in self.rates:
            rate = (rate + self.rates[self.speculating][0]) / 2
        self.rates[self.speculating] = (rate, self.windows)
        self.speculating = self._next()
        self.passes = self.tokens = 0
        self.seconds = 0.0

    def _next(self) -> bool:
        if False not in self.rates:
            self.trying = self.windows >= RETRY
            return not self.trying
        (on, on_at), (off, off_at) = self.rates[True], self.rates[False]
        best = on >= off
        if self.trying:
            self.retry = RETRY if self.speculating == best else min(2 * self.retry, MAX_RETRY)
        self.trying = self.windows - min(on_at, off_at) >= self.retry  # load changes: measure the other again
        return on_at < off_at if self.trying else best
