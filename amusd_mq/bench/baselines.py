"""The schedules speculation is measured against, run in one process on the same models and sessions:
plain decoding (`ar`) and synchronous speculative decoding (`sd`: draft gamma, then verify), in any sampling
mode (amusd_mq.sampling), on the same runner as the services."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..runtime.lm import Check, Guess, propose_guesses, verify_checks
from ..sampling import GREEDY, Sampling
from ..sequence import Sequence


@dataclass
class Run:
    token_ids: list[int] = field(default_factory=list)
    times: list[float] = field(default_factory=list)  # perf_counter() when each token was committed
    verify_steps: int = 0
    draft_steps: int = 0
    proposed: int = 0
    accepted: int = 0

    def commit(self, seq: Sequence, tokens: list[int], proposed: int, accepted: int) -> None:
        now = time.perf_counter()
        tokens, _ = seq.verdict(len(seq.committed), tokens, proposed, accepted, now)
        self.token_ids += tokens
        self.times += [now] * len(tokens)
        self.verify_steps += 1
        self.proposed += proposed
        self.accepted += accepted


def autoregressive(lm, prompt_ids: list[int], max_new_tokens: int, stop_token_ids,
                   sampling: Sampling = GREEDY) -> Run:
    """Plain decoding with the same cache and termination rules: the output speculation must match (greedy,
    seeded) or match in distribution (exact)."""
    seq = Sequence(prompt_ids=prompt_ids, max_new_tokens=max_new_tokens, stop_token_ids=frozenset(stop_token_ids),
                   created=time.perf_counter())
    run = Run()
    with lm.session() as session:
        while not seq.done:
            [(tokens, _)] = verify_checks(lm, [Check(session, prompt_ids + seq.committed, [], len(seq.committed), sampling)])
            run.commit(seq, tokens, 0, 0)
    return run


def speculative_sync(draft_lm, verify_lm, prompt_ids: list[int], max_new_tokens: int, stop_token_ids,
                     gamma: int, sampling: Sampling = GREEDY) -> Run:
    """Leviathan et al.: the draft proposes gamma tokens one by one, then the verifier checks them at once."""
    seq = Sequence(prompt_ids=prompt_ids, max_new_tokens=max_new_tokens, stop_token_ids=frozenset(stop_token_ids),
                   created=time.perf_counter())
    run = Run()
    with draft_lm.session() as draft_session, verify_lm.session() as verify_session:
        while not seq.done:
            draft: list[int] = []
            q = []
            start = len(seq.committed)
            for _ in range(min(gamma, seq.max_new_tokens - start - 1)):
                [(token, ids, probs)] = propose_guesses(draft_lm, [Guess(draft_session, prompt_ids + seq.committed + draft,
                                                                 start + len(draft), sampling)])
                draft.append(token)
                q.append((ids, probs))
                run.draft_steps += 1
            [(tokens, accepted)] = verify_checks(verify_lm, [Check(verify_session, prompt_ids + seq.committed, draft, start,
                                                            sampling, q)])
            draft_session.rollback(len(prompt_ids) + start + accepted)  # its rejected guesses are in its cache
            run.commit(seq, tokens, len(draft), accepted)
    return run


def explain_difference(lm, prompt_ids: list[int], ar_ids: list[int], other_ids: list[int],
                       sampling: Sampling = GREEDY) -> str:
    """Where two greedy or seeded outputs part, and how close the verify model's two candidates were there: in
    the logits, or in seeded mode in the scores it takes the argmax of (logits / T plus the noise)."""
    at = next((i for i, (a, b) in enumerate(zip(ar_ids, other_ids)) if a != b), min(len(ar_ids), len(other_ids)))
    if at == min(len(ar_ids), len(other_ids)):
        return f"outputs differ in length after {at} equal tokens"
    with lm.session() as session:
        scores = session.logits(prompt_ids + ar_ids[:at], 1)
    if sampling.mode == "seeded":
        scores = sampling.scores(scores, [at])
    gap = (scores[0, ar_ids[at]] - scores[0, other_ids[at]]).item()
    what = "logits" if sampling.mode == "greedy" else "scores (logits / T plus the seeded noise)"
    return (f"first difference at token {at}: the verify model's {what} for the two candidates differ there by only "
            f"{abs(gap):.4f}, a near-tie that {lm.model.dtype} rounding can flip; float32 rules this out")
