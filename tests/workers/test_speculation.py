"""The lookahead policy: the verifier's cost line, acceptance estimates, and the depth that maximises goodput."""
import pytest

from amusd_mq.sequence import Sequence
from amusd_mq.workers.speculation import (
    RETRY,
    WINDOW,
    WINDOW_S,
    Acceptance,
    CostModel,
    Switch,
    best_depth,
    expected_tokens,
)
from amusd_mq.workers.verify import VerifyRequest

GPU_LIKE = CostModel([(1, 6.9), (8, 7.7), (128, 13.6)])  # 8B verify passes on one H200: near flat
CPU_LIKE = CostModel([(1, 230.0), (5, 830.0)])  # a 1.5B model on an AVX2-only CPU: a 5-token pass costs 3.6x


def test_cost_line_fits_the_calibration_and_follows_recent_passes():
    line = CostModel([(1, 10.0), (9, 18.0)])
    assert line.predict(5) == pytest.approx(14.0)
    for _ in range(64):  # the machine got slower: every pass of 4 tokens now takes 30 ms
        line.observe(4, 30.0)
    assert line.predict(4) == pytest.approx(30.0, rel=0.1)
    assert line.per_token >= 0 and line.base > 0


def test_a_line_needs_two_sizes():
    with pytest.raises(ValueError):
        CostModel([(4, 1.0), (4, 2.0)])


def test_expected_tokens_per_pass():
    assert expected_tokens(0.0, 5) == 1.0
    assert expected_tokens(1.0, 5) == 6.0
    assert expected_tokens(0.5, 2) == pytest.approx(1.75)


def test_flat_passes_check_every_guess_steep_ones_check_none():
    assert best_depth([0.8], GPU_LIKE, cap=8) == 8
    assert best_depth([0.8], CPU_LIKE, cap=8) == 1  # each guess costs 150 ms: only the likeliest pays
    assert best_depth([0.3], CPU_LIKE, cap=8) == 0
    assert best_depth([0.99], CostModel([(1, 100.0), (5, 150.0)]), cap=8) == 8


def test_depth_shrinks_as_the_batch_grows_and_acceptance_falls():
    depths = [best_depth([0.8] * rows, GPU_LIKE, cap=8) for rows in (1, 8, 32, 128)]
    assert depths == sorted(depths, reverse=True) and depths[0] > depths[-1]
    assert best_depth([0.05] * 32, GPU_LIKE, cap=8) < best_depth([0.9] * 32, GPU_LIKE, cap=8)


def test_acceptance_starts_at_the_prior_and_forgets_old_text():
    a = Acceptance(0.5)
    assert a.rate == 0.5
    a.observe(20, 20)
    assert a.rate > 0.9
    for _ in range(40):
        a.observe(0, 1)
    assert a.rate < 0.5


def test_a_verdict_scores_checked_guesses_and_the_one_standing_where_the_verifier_chose():
    r = VerifyRequest(rid="r", prompt=[1], lookahead=8,
                      seq=Sequence(prompt_ids=[1], max_new_tokens=20, stop_token_ids=frozenset(), created=0.0))
    r.offer(0, 0, [5, 6, 7])
    assert r.score(0, [5, 6], 1, [5, 9]) == (1, 2)  # 5 accepted, 6 rejected
    assert r.score(0, [5, 6], 2, [5, 6, 7]) == (3, 3)  # both accepted, and the unchecked 7 was right too
    assert r.score(0, [], 0, [4]) == (0, 1)  # nothing checked: the standing guess 5 was wrong
    assert r.score(0, [5, 6, 7], 3, [5, 6, 7, 8]) == (3, 3)  # no guess stands past the draft


def run_windows(switch: Switch, windows: int, rate: dict[bool, float]) -> list[bool]:
    """Feed whole windows of passes at each choice's rate; returns the choice in force during each window."""
    used = []
    for _ in range(windows):
        used.append(switch.speculating)
        for _ in range(WINDOW):
            switch.observe(int(rate[switch.speculating] * WINDOW_S), WINDOW_S)
    return used


def test_the_switch_keeps_what_delivers_more_and_retries_the_other_less_and_less():
    switch = Switch()
    used = run_windows(switch, RETRY + 2 + 8 * RETRY, {True: 80, False: 100})  # speculation costs more than it earns
    assert used[:RETRY] == [True] * RETRY and used[RETRY] is False  # it starts speculating, then measures off
    retries = [i for i, on in enumerate(used) if on][RETRY:]
    assert len(retries) == 3 and retries[1] - retries[0] < retries[2] - retries[1]  # off wins; retried ever later
    switch = Switch()
    used = run_windows(switch, RETRY + 2 + 8 * RETRY, {True: 150, False: 100})
    assert used.count(False) == 3 and used[RETRY] is False and used[RETRY + 1]  # off measured, on kept
