from amusd_mq.sequence import Sequence


def seq(max_new=20, stop=()):
    return Sequence(prompt_ids=[1, 2], max_new_tokens=max_new, stop_token_ids=frozenset(stop), created=0.0)


def test_proposals_are_forwarded_in_order_and_duplicates_ignored():
    s = seq()
    assert s.propose(0, 0, [5], now=0.0) == (0, [5], False)
    assert s.propose(0, 1, [6, 7], now=0.0) == (1, [6, 7], False)
    assert s.propose(0, 1, [6], now=0.0) == (3, [], False)  # duplicate
    assert s.pending == [5, 6, 7]


def test_accepting_verdict_keeps_remaining_proposals():
    s = seq()
    s.propose(0, 0, [5, 6, 7], now=0.0)
    assert s.verdict(0, [5, 6], proposed=2, accepted=1, now=0.0) == ([5, 6], False)
    assert s.committed == [5, 6] and s.pending == [7] and s.epoch == 0


def test_rejecting_verdict_is_a_rollback_point():
    s = seq()
    s.propose(0, 0, [5, 6, 7], now=0.0)
    assert s.verdict(0, [5, 9], proposed=3, accepted=1, now=0.0) == ([5, 9], True)
    assert s.epoch == 1 and s.pending == [] and s.stats.rollbacks == 1
    # proposals built on the old path are stale; the new epoch's are taken from the committed end
    assert s.propose(0, 2, [7], now=0.0) == (2, [], False) and s.stats.stale == 1
    assert s.propose(1, 2, [8], now=0.0) == (2, [8], False)


def test_late_proposal_contradicting_a_commit_rolls_back():
    s = seq()
    s.verdict(0, [5], 0, 0, now=0.0)  # the verifier decoded position 0 alone
    assert s.propose(0, 0, [4], now=0.0) == (0, [], True)
    assert s.epoch == 1
    # a late proposal that agrees with the commit is fine and the rest is forwarded
    t = seq()
    t.verdict(0, [5], 0, 0, now=0.0)
    assert t.propose(0, 0, [5, 6], now=0.0) == (1, [6], False)


def test_gap_in_proposals_forces_a_resend():
    s = seq()
    s.propose(0, 0, [5], now=0.0)
    assert s.propose(0, 2, [7], now=0.0) == (2, [], True)
    assert s.pending == [] and s.epoch == 1


def test_stale_or_duplicate_verdicts_are_ignored():
    s = seq()
    assert s.verdict(0, [5], 0, 0, now=0.0) is not None
    assert s.verdict(0, [5], 0, 0, now=0.0) is None  # duplicate
    assert s.verdict(3, [5], 0, 0, now=0.0) is None  # from the future
    assert s.committed == [5]


def test_terminates_at_first_stop_token_keeping_it():
    s = seq(stop={9})
    assert s.verdict(0, [5, 9, 6], 2, 1, now=0.0) == ([5, 9], False)
    assert s.finish_reason == "stop" and s.done
    assert s.verdict(2, [1], 0, 0, now=0.0) is None


def test_terminates_at_max_new_tokens():
    s = seq(max_new=3, stop={9})
    s.verdict(0, [1, 2], 1, 1, now=0.0)
    assert s.verdict(2, [3, 4, 5], 2, 2, now=0.0)[0] == [3]
    assert s.finish_reason == "length" and s.committed == [1, 2, 3]
    t = seq(max_new=2, stop={9})
    t.verdict(0, [1, 2, 9], 2, 2, now=0.0)  # the stop token falls past the limit
    assert t.finish_reason == "length" and t.committed == [1, 2]
    u = seq(max_new=2, stop={9})
    u.verdict(0, [1, 9], 1, 1, now=0.0)
    assert u.finish_reason == "stop"


def test_summary_counts():
    s = seq(max_new=4)
    s.propose(0, 0, [1, 2, 3], now=0.0)
    s.verdict(0, [1, 2, 7], 3, 2, now=0.0)
    s.verdict(3, [8], 0, 0, now=0.0)
    summary = s.summary(now=0.0)
    assert summary["new_tokens"] == 4 and summary["verify_steps"] == 2
    assert summary["proposed"] == 3 and summary["accepted"] == 2 and summary["rollbacks"] == 1
    assert summary["tokens_per_verify_step"] == 2.0


def test_timings_split_draft_steps_verifier_turnaround_and_restarts():
    s = seq()
    s.propose(0, 0, [5], now=0.0)
    s.propose(0, 1, [6, 7], now=1.0)  # two tokens in 1 s
    s.verdict(0, [5], proposed=0, accepted=0, now=3.0, step_s=0.0)  # first token
    s.verdict(1, [6, 9], proposed=2, accepted=1, now=4.0, step_s=0.5)  # 1 s apart, 0.5 s of it the pass; rollback
    s.propose(1, 3, [8], now=10.0)  # the first proposal after the rollback
    s.propose(1, 4, [8], now=10.5)
    summary = s.summary(now=12.0)
    assert summary["verify_step_ms"] == 500 and summary["verify_gap_ms"] == 500
    assert summary["draft_step_ms"] == 500  # (1 s + 0.5 s) / 3 tokens
    assert summary["restart_ms"] == 6000
    assert summary["ttft_s"] == 3.0 and summary["elapsed_s"] == 12.0 and summary["queue_s"] == 0.0


def test_the_clock_starts_at_zero_like_any_other_time():
    """Times are whatever the caller's clock says: 0.0 is a time, not an absent one."""
    s = seq(max_new=2)
    s.started = 0.0
    s.verdict(0, [5], proposed=0, accepted=0, now=0.0)
    s.verdict(1, [6], proposed=0, accepted=0, now=2.0)
    summary = s.summary(now=5.0)
    assert s.finished == 2.0 and summary["ttft_s"] == 0.0 and summary["elapsed_s"] == 2.0
    assert summary["decode_tokens_per_s"] == 0.5


def test_stop_at_ends_at_a_stop_string_and_drops_what_follows():
    s = Sequence(prompt_ids=[1], max_new_tokens=10, stop_token_ids=frozenset(), created=0.0)
    s.verdict(0, [5, 6, 7, 8], proposed=3, accepted=3, now=0.0)
    s.stop_at(2, now=0.0)
    assert s.committed == [5, 6] and s.finish_reason == "stop" and s.done
    assert s.verdict(2, [9], proposed=0, accepted=0, now=0.0) is None
