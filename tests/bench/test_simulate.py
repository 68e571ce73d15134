"""The discrete-event ideal on small cases worked out by hand."""
import pytest

from amusd_mq.bench import simulate
from amusd_mq.bench.trace import LatencyProfile, TracedPrompt

LAT = LatencyProfile(draft_ms=1.0, verify_ms={1: 10.0})


def prompt(matches):
    target = list(range(len(matches)))
    return TracedPrompt("p", [100], target, [t if ok else t + 50 for t, ok in zip(target, matches)])


def test_autoregressive_one_verify_pass_per_token():
    assert simulate.autoregressive(prompt([True] * 3), LAT) == [10, 20, 30]


def test_synchronous_rounds():
    assert simulate.synchronous(prompt([True] * 5), LAT, gamma=2) == [12, 12, 12, 23, 23]
    assert simulate.synchronous(prompt([True, False, True, True, True]), LAT, gamma=2) == [12, 12, 24, 24, 24]


def test_asynchronous_eager_with_a_right_draft():
    # draft fills the lookahead while the verifier prefills; then 3 proposals + bonus, then the last token
    assert simulate.asynchronous(prompt([True] * 6), LAT, lookahead=4, policy="eager") == [10, 20, 20, 20, 20, 30]


def test_asynchronous_eager_recovers_from_a_wrong_guess():
    times = simulate.asynchronous(prompt([True, False, True, True]), LAT, lookahead=4, policy="eager")
    assert times == [10, 20, 30, 40]


def test_amusd_policy_waits_for_two_proposals():
    # verifier waits until t=2 for two guesses, then takes everything the draft has (no cap)
    times = simulate.asynchronous(prompt([True] * 5), LAT, lookahead=1, policy="amusd")
    assert times == [12, 12, 12, 22, 22]  # the draft ran on during the first pass: no drafting in round two


def test_lookahead_caps_the_draft():
    slow = simulate.asynchronous(prompt([True] * 9), LAT, lookahead=1, policy="eager")
    fast = simulate.asynchronous(prompt([True] * 9), LAT, lookahead=8, policy="eager")
    assert simulate.ms_per_token(fast) < simulate.ms_per_token(slow)


def test_ms_per_token_excludes_the_first_token():
    assert simulate.ms_per_token([5, 10, 20]) == 7.5
    assert simulate.ms_per_token([5]) == 0.0


def test_latency_profile_interpolates_and_extrapolates():
    lat = LatencyProfile(3.0, {1: 10.0, 9: 14.0})
    assert lat.verify(1) == 10 and lat.verify(5) == 12 and lat.verify(17) == 18 and lat.verify(0) == 10
    assert lat.step_ms("draft", 7) == 3.0


def test_bounds_match_the_worked_example():
    # REFERENCE.md section 2: t_d 4 ms, t_v 40 ms, alpha 0.8 -> best sync SD 2.47x at gamma 6; DSI 3.33x
    b = simulate.bounds(alpha=0.8, c=0.1, t_v=40, t_d=4)
    assert b["sync_best_gamma"] == 6 and b["sync_best"] == pytest.approx(2.47, abs=0.01)
    assert b["async_dsi"] == pytest.approx(3.33, abs=0.01)
    assert b["two_device"] > b["sync_best"]

