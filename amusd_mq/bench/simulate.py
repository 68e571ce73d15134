"""The ideal: each schedule replayed as a discrete-event simulation with zero messaging cost.

Fed a traced prompt (which draft guesses are right) and a latency profile (t_d per draft step, t_v(n)
for a verify pass over n tokens), it returns the commit time of every token. A measured run divided by
this is the share of the schedule's own speed that the implementation delivers. Also here: the analytic
bounds of synchronous and asynchronous speculation for a per-token acceptance alpha and a cost ratio c.
"""
from __future__ import annotations

import math

from .trace import LatencyProfile, TracedPrompt


def autoregressive(p: TracedPrompt, lat: LatencyProfile) -> list[float]:
    times, now = [], 0.0
    for i in range(len(p.target)):
        now += lat.verify(len(p.prompt_ids) if i == 0 else 1)
        times.append(now)
    return times


def synchronous(p: TracedPrompt, lat: LatencyProfile, gamma: int) -> list[float]:
    match, n = p.matches(), len(p.target)
    times, now, c = [], 0.0, 0
    while c < n:
        k = min(gamma, n - c - 1)
        now += k * lat.draft_ms + lat.verify((len(p.prompt_ids) if c == 0 else 1) + k)
        accepted = next((i for i in range(k) if not match[c + i]), k)
        times += [now] * (accepted + 1)
        c += accepted + 1
    return times


def asynchronous(p: TracedPrompt, lat: LatencyProfile, lookahead: int, policy: str = "eager") -> list[float]:
    """Draft and verifier each on their own device. `eager` (ours): the verifier never waits and takes up
    to `lookahead` proposals. `amusd` (the original): it waits for 2 proposals and takes all of them."""
    match, n = p.matches(), len(p.target)
    cap = n if policy == "amusd" else lookahead
    times: list[float] = []
    c = 0  # committed tokens
    guesses: list[bool] = []  # correctness of the draft's guesses for positions c, c+1, ...
    draft_pos, draft_done, draft_wasted = 0, lat.draft_ms, False  # first step is the prefill
    verify_done, verify_k, now = math.inf, 0, 0.0
    first_verify = True

    def start_verify():
        nonlocal verify_done, verify_k, first_verify
        room = n - c - 1
        available = len(guesses)
        if policy == "amusd" and available < min(2, room) and draft_done < math.inf:
            verify_done = math.inf  # waits for the draft
            return
        verify_k = min(available, cap, room)
        verify_done = now + lat.verify((len(p.prompt_ids) if first_verify else 1) + verify_k)
        first_verify = False

    start_verify()
    while c < n:
        if draft_done <= verify_done:
            now = draft_done
            if not draft_wasted:
                on_path = all(guesses) and draft_pos < n
                guesses.append(on_path and match[draft_pos])
                draft_pos += 1
            draft_wasted = False
            idle = draft_pos - c >= cap or draft_pos >= n
            draft_done = math.inf if idle else now + lat.draft_ms
            if verify_done == math.inf:
                start_verify()
            continue
        now = verify_done
        taken = guesses[:verify_k]
        accepted = next((i for i, ok in enumerate(taken) if not ok), verify_k)
        committed = accepted + 1
        times += [now] * committed
        rollback = accepted < verify_k or (len(guesses) > verify_k and not guesses[verify_k])
        c += committed
        if rollback or draft_pos < c:
            guesses = []
            if draft_done < math.inf:
                draft_wasted = True  # the step in flight builds on a discarded or overtaken prefix
            draft_pos = c
        else:
            guesses = guesses[committed:]
        was_idle = draft_done == math.inf
        if was_idle and c < n and draft_pos - c < cap and draft_pos < n:
            draft_done = now + lat.draft_ms
        start_verify()
    return times[:n]


def ms_per_token(times: list[float]) -> float:
    """First commit to last, per token: prefill excluded, the same boundary for every schedule."""
    return (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else 0.0


def bounds(alpha: float, c: float, t_v: float, t_d: float) -> dict[str, float]:
    """Speedups over autoregressive decoding that no schedule of each kind can beat."""
    alpha = min(alpha, 1 - 1e-9)

    def sync(g):
        return (1 - alpha ** (g + 1)) / ((1 - alpha) * (g * c + 1))

    best_gamma = max(range(1, 33), key=sync)
    gamma_fit = max(1, int(t_v // t_d)) if t_d > 0 else 32
    return {
        "sync_best": sync(best_gamma), "sync_best_gamma": best_gamma,
        "async_dsi": 1 / (1 - alpha + c),
        "two_device": (1 - alpha ** (gamma_fit + 1)) / (1 - alpha),
    }
