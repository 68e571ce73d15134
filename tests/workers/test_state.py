"""The workers' local bookkeeping: the draft's rollback and the verifier's proposal buffer."""
from amusd_mq.sequence import Sequence
from amusd_mq.workers.draft import DraftRequest
from amusd_mq.workers.verify import VerifyRequest


def draft(lookahead=3):
    return DraftRequest(rid="r", prompt=[1], committed=[], epoch=0, lookahead=lookahead, max_new_tokens=10,
                        stop=frozenset({99}))


def test_draft_keeps_guesses_that_commits_confirm():
    r = draft()
    r.guess = [5, 6, 7]
    assert r.adopt(0, [5, 6])
    assert r.guess == [5, 6, 7] and r.revision == 0


def test_draft_rolls_back_to_the_first_divergence():
    r = draft()
    r.guess = [5, 6, 7, 8]
    assert r.adopt(0, [5, 9])
    assert r.guess == [5, 9] and r.committed == [5, 9] and r.revision == 1


def test_draft_behind_the_commit_adopts_it():
    r = draft()
    r.guess = [5]
    assert r.adopt(0, [5, 6, 7])
    assert r.guess == [5, 6, 7] and r.revision == 0


def test_draft_detects_a_gap_and_ignores_repeats():
    r = draft()
    assert not r.adopt(2, [1])
    assert r.adopt(0, [5, 6]) and r.adopt(1, [6, 7])
    assert r.committed == [5, 6, 7]


def test_draft_idles_at_the_lookahead_cap_and_after_a_stop_token():
    r = draft(lookahead=2)
    r.adopt(0, [5])
    r.guess += [6, 7]
    assert r.idle(max_context=100)
    r.adopt(1, [6])
    assert not r.idle(max_context=100)
    r.guess.append(99)
    assert r.idle(max_context=100)
    assert draft().idle(max_context=1)


def verify(max_new=10, lookahead=4):
    seq = Sequence(prompt_ids=[1], max_new_tokens=max_new, stop_token_ids=frozenset(), created=0.0)
    return VerifyRequest(rid="r", prompt=[1], seq=seq, lookahead=lookahead)


def test_verifier_takes_contiguous_proposals_up_to_the_limits():
    r = verify(max_new=4, lookahead=8)
    r.offer(0, 0, [5, 6])
    r.offer(0, 3, [8])  # not contiguous yet
    assert r.take() == [5, 6]
    r.offer(0, 2, [7])
    assert r.take() == [5, 6, 7]  # room for the verifier's own token
    assert verify(lookahead=2).take() == []


def test_verifier_condemns_an_epoch_a_commit_contradicts():
    r = verify()
    r.offer(0, 0, [5, 6, 7])
    r.seq.committed += [5, 9]
    r.settle(0, [5, 9])
    assert r.proposals == {} and r.dead_epoch == 0
    r.offer(0, 2, [3])  # more of the condemned epoch
    assert r.take() == []
    r.offer(1, 2, [3, 4])
    assert r.take() == [3, 4]


def test_verifier_keeps_proposals_past_an_agreeing_commit():
    r = verify()
    r.offer(0, 0, [5, 6, 7])
    r.seq.committed += [5, 6]
    r.settle(0, [5, 6])
    assert r.take() == [7] and r.dead_epoch == -1


def test_newer_epoch_replaces_older_proposals():
    r = verify()
    r.offer(0, 0, [5, 6])
    r.offer(1, 0, [7])
    assert r.take() == [7]
    r.offer(0, 1, [8])
    assert r.take() == [7]
