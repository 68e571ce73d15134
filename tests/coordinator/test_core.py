"""The coordinator's core, fed messages and ticks at chosen times: every way a request can end, and what each
sends to whom. No process, socket or clock."""
import dataclasses
import logging

import pytest

from amusd_mq import config, models
from amusd_mq.coordinator.core import Core, Out
from amusd_mq.text.vocab import Vocabulary
from amusd_mq.wire import protocol as p

VERIFIER, OTHER_VERIFIER, DRAFTER, CLIENT = b"verifier", b"verifier-2", b"drafter", b"client"
VOCAB = Vocabulary.of(models.tiny_tokenizer())
PROMPT = [5, 6, 7]
SETTINGS = {"AMUSD_HEARTBEAT_S": "1", "AMUSD_LIVENESS": "3", "AMUSD_QUEUE_TIMEOUT_S": "5", "AMUSD_FAILOVER_S": "4",
            "AMUSD_PROGRESS_TIMEOUT_S": "10", "AMUSD_LOOKAHEAD": "4"}


def register(role: str, max_batch: int = 4) -> p.Register:
    return p.Register(role=role, model="m", runner="native", kernels="aten", vocab_size=258, vocab_hash=VOCAB.hash,
                      max_context=64, eos_token_ids=[2], max_batch=max_batch)


class Fed:
    """A core and the time its calls happen at."""

    def __init__(self, **settings: str):
        self.core = Core(config.load(env={**SETTINGS, **settings}), VOCAB)
        self.now = 100.0

    def send(self, sender: bytes, *msgs: p.Message) -> Out:
        return self.core.handle(sender, list(msgs), self.now)

    def tick(self, after_s: float) -> Out:
        self.now += after_s
        return self.core.tick(self.now)

    def pass_time(self, seconds: float, *alive: bytes, busy: p.Heartbeat = p.Heartbeat()) -> Out:
        """Ticks a second apart, with every peer in `alive` heard from before each (a worker's heartbeat, the
        client's ping); what the ticks sent, together."""
        sent = Out()
        while seconds > 1e-9:
            self.now += min(1.0, seconds)
            seconds -= min(1.0, seconds)
            for peer in alive:
                self.send(peer, p.Ping() if peer == CLIENT else busy)
            for receiver, msgs in self.core.tick(self.now).messages.items():
                sent.messages.setdefault(receiver, []).extend(msgs)
        return sent

    def deploy(self, draft: bool = True) -> None:
        self.send(VERIFIER, register("verify"))
        if draft:
            self.send(DRAFTER, register("draft"))

    def generate(self, **fields) -> tuple[Out, str]:
        """A request from CLIENT; its id with the workers, once it was let in."""
        out = self.send(CLIENT, p.Generate(**{"req_id": "r1", "max_new_tokens": 3, "prompt_ids": PROMPT, **fields}))
        return out, self.core.by_client.get((CLIENT, fields.get("req_id", "r1")))

    def status(self) -> p.StatusReply:
        return self.send(CLIENT, p.Status(req_id="s")).to(CLIENT)[0]


def one(msgs: list[p.Message], kind: type) -> p.Message:
    found = [m for m in msgs if isinstance(m, kind)]
    assert len(found) == 1, msgs
    return found[0]


def error(out: Out, receiver: bytes = CLIENT) -> p.Error:
    return one(out.to(receiver), p.Error)


def test_a_request_runs_from_its_prompt_to_done_through_draft_and_verifier():
    fed = Fed()
    fed.deploy()
    out, rid = fed.generate(prompt="hello there", prompt_ids=None)
    assert out.messages == {} and [job.rid for job in out.tokenize] == [rid]  # nothing sent until it is tokenized
    ids = out.tokenize[0].run()
    assert ids == VOCAB.tokenizer.encode("hello there").ids
    out = fed.core.tokenized(rid, ids, fed.now)
    assign = one(out.to(VERIFIER), p.Assign)
    assert assign.req_id == rid and assign.prompt_ids == ids and assign.committed == [] and assign.lookahead == 4
    assert one(out.to(DRAFTER), p.Assign).prompt_ids == ids

    relayed = one(fed.send(DRAFTER, p.Propose(req_id=rid, epoch=0, pos=0, token_ids=[40, 41])).to(VERIFIER), p.Propose)
    assert (relayed.pos, relayed.token_ids) == (0, [40, 41])
    out = fed.send(VERIFIER, p.Verdict(req_id=rid, start=0, token_ids=[40, 41], proposed=2, accepted=1, epoch=0,
                                       lookahead=4))
    assert one(out.to(None), p.Commit).token_ids == [40, 41]
    tokens = one(out.to(CLIENT), p.Tokens)
    assert (tokens.req_id, tokens.start, tokens.token_ids) == ("r1", 0, [40, 41])
    assert tokens.text == VOCAB.tokenizer.decode([40, 41])

    out = fed.send(VERIFIER, p.Verdict(req_id=rid, start=2, token_ids=[42, 43], proposed=1, accepted=0, epoch=0,
                                       lookahead=4))
    assert one(out.to(CLIENT), p.Tokens).token_ids == [42]  # cut at max_new_tokens
    done = one(out.to(CLIENT), p.Done)
    assert done.finish_reason == "length" and done.stats["new_tokens"] == 3 and done.stats["accepted"] == 1
    assert one(out.to(VERIFIER), p.Release).req_id == rid and one(out.to(DRAFTER), p.Release).req_id == rid
    assert one(out.to(None), p.Commit).done
    assert fed.status().served == 1 and not fed.core.requests and not fed.core.by_client


def test_a_stop_string_ends_the_request_at_the_token_that_completes_it():
    fed = Fed()
    fed.deploy(draft=False)
    text = VOCAB.tokenizer.decode([40, 41, 42])
    _, rid = fed.generate(max_new_tokens=10, stop=[text[-1]])
    out = fed.send(VERIFIER, p.Verdict(req_id=rid, start=0, token_ids=[40, 41, 42, 43], proposed=0, accepted=0,
                                       epoch=0, lookahead=4))
    assert one(out.to(CLIENT), p.Done).finish_reason == "stop"
    assert one(out.to(CLIENT), p.Tokens).token_ids[-1] == 42


def test_a_cancelled_request_frees_its_workers_and_tells_no_one_else():
    fed = Fed()
    fed.deploy()
    _, rid = fed.generate()
    out = fed.send(CLIENT, p.Cancel(req_id="r1"))
    assert one(out.to(VERIFIER), p.Release).req_id == rid and one(out.to(DRAFTER), p.Release).req_id == rid
    assert CLIENT not in out.messages
    assert fed.status().cancelled == 1 and not fed.core.by_client
    late = fed.send(VERIFIER, p.Verdict(req_id=rid, start=0, token_ids=[9], proposed=0, accepted=0, epoch=0,
                                        lookahead=4))
    assert one(late.to(VERIFIER), p.Release).req_id == rid and CLIENT not in late.messages  # its Release was lost


def test_a_request_cancelled_while_its_prompt_is_tokenized_is_never_queued():
    fed = Fed()
    fed.deploy()
    out, rid = fed.generate(prompt="hello", prompt_ids=None)
    job = out.tokenize[0]
    assert fed.send(CLIENT, p.Cancel(req_id="r1")).untokenize == [rid]
    assert fed.core.tokenized(rid, job.run(), fed.now).messages == {}
    assert not fed.core.requests and fed.core.admission.waiting == 0


@pytest.mark.parametrize("fields,match", [
    ({"max_new_tokens": 0}, "max_new_tokens must be at least 1"),
    ({"prompt": "x"}, "exactly one of prompt, prompt_ids and messages"),
    ({"prompt_ids": []}, "the prompt is empty"),
    ({"prompt_ids": [300]}, "outside the vocabulary of 258"),
    ({"max_new_tokens": 62}, "exceeds the model context of 64"),
    ({"lookahead": 10 ** 6}, "lookahead must be"),
    ({"policy": "eagerest"}, "policy must be one of"),
    ({"temperature": -1.0}, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "prompt_ids": None}, "has no chat template"),
    ({"prompt": "x" * 2000, "prompt_ids": None}, "can't fit the model context"),
])
def test_an_invalid_request_is_refused_with_its_reason_and_holds_nothing(fields, match):
    fed = Fed()
    fed.deploy()
    out, _ = fed.generate(**fields)
    refusal = error(out)
    assert refusal.code == "invalid_request" and match in refusal.message and refusal.req_id == "r1"
    assert VERIFIER not in out.messages and not out.tokenize
    assert not fed.core.by_client and fed.core.admission.waiting == 0 and fed.status().rejected["invalid_request"] == 1


def test_a_duplicate_id_or_a_full_queue_is_refused_and_the_first_request_runs_on():
    fed = Fed(AMUSD_MAX_CLIENT_REQUESTS="2")
    fed.deploy()
    _, rid = fed.generate()
    assert "already in flight" in error(fed.generate()[0]).message
    fed.generate(req_id="r2")
    assert error(fed.generate(req_id="r3")[0]).code == "too_many_requests"
    assert fed.core.by_client[(CLIENT, "r1")] == rid and len(fed.core.by_client) == 2


def test_a_worker_of_another_vocabulary_or_role_is_refused():
    fed = Fed()
    stranger = dataclasses.replace(register("verify"), vocab_hash="other")
    assert error(fed.send(VERIFIER, stranger), VERIFIER).code == "vocab_mismatch"
    assert error(fed.send(VERIFIER, dataclasses.replace(register("verify"), role="judge")),
                 VERIFIER).code == "invalid_register"
    assert fed.status().verifiers == 0


def test_a_request_held_for_a_verifier_times_out_or_starts_when_one_registers():
    fed = Fed()
    out, rid = fed.generate()
    assert out.messages == {} and rid in fed.core.held
    fed.generate(req_id="r2")
    fed.pass_time(4, CLIENT)
    out = fed.send(VERIFIER, register("verify"))
    assert {m.req_id for m in out.to(VERIFIER) if isinstance(m, p.Assign)} == set(fed.core.requests)
    assert len(fed.core.requests) == 2

    fed = Fed()
    fed.generate()
    assert fed.pass_time(5, CLIENT).to(CLIENT) == []
    refusal = error(fed.pass_time(0.5, CLIENT))
    assert refusal.code == "no_worker" and "within 5s" in refusal.message and fed.status().failed == {"no_worker": 1}


def test_no_verifier_and_no_queue_time_is_refused_at_once():
    fed = Fed(AMUSD_QUEUE_TIMEOUT_S="0")
    refusal = error(fed.generate()[0])
    assert refusal.code == "no_worker" and not fed.core.by_client


def commit_two(fed: Fed, rid: str) -> None:
    fed.send(VERIFIER, p.Verdict(req_id=rid, start=0, token_ids=[40, 41], proposed=0, accepted=0, epoch=0,
                                 lookahead=4))


def test_a_lost_verifiers_request_resumes_on_another_from_what_it_committed():
    fed = Fed()
    fed.deploy()
    _, rid = fed.generate(max_new_tokens=8)
    commit_two(fed, rid)
    fed.pass_time(4, CLIENT, DRAFTER)  # the verifier is silent past its 3 s window
    assert VERIFIER not in fed.core.workers and fed.core.requests[rid].orphaned is not None
    out = fed.send(OTHER_VERIFIER, register("verify"))
    assign = one(out.to(OTHER_VERIFIER), p.Assign)
    assert assign.committed == [40, 41] and assign.req_id == rid
    assert one(out.to(None), p.Commit).epoch == 1  # the draft proposes again, under a new epoch


def test_a_lost_verifiers_request_fails_with_what_it_committed_when_none_takes_over():
    fed = Fed()
    fed.deploy()
    _, rid = fed.generate()
    commit_two(fed, rid)
    fed.pass_time(4, CLIENT, DRAFTER)
    lost_at = fed.core.requests[rid].orphaned
    assert VERIFIER not in fed.core.workers and lost_at is not None
    assert fed.pass_time(lost_at + 4 - fed.now, CLIENT, DRAFTER).to(CLIENT) == []
    refusal = error(fed.pass_time(0.5, CLIENT, DRAFTER))
    assert refusal.code == "worker_lost" and refusal.token_ids == [40, 41] and refusal.req_id == "r1"
    assert not fed.core.requests and fed.status().failed == {"worker_lost": 1}


def test_a_verifier_making_no_progress_is_resent_the_request_then_dropped_if_its_pass_never_ends():
    fed = Fed()
    fed.deploy(draft=False)
    _, rid = fed.generate()
    stuck = p.Heartbeat(busy=True, passes=7)
    assert not [m for m in fed.pass_time(10, CLIENT, VERIFIER, busy=stuck).to(VERIFIER) if isinstance(m, p.Assign)]
    assert one(fed.pass_time(0.5, CLIENT, VERIFIER, busy=stuck).to(VERIFIER), p.Assign).epoch == 1  # past 10 s
    fed.pass_time(10, CLIENT, VERIFIER, busy=stuck)
    assert VERIFIER in fed.core.workers
    fed.pass_time(0.5, CLIENT, VERIFIER, busy=stuck)  # 20 s in the same pass: a dead verifier
    assert VERIFIER not in fed.core.workers and fed.core.requests[rid].orphaned is not None


def test_a_silent_client_loses_its_requests_and_their_workers_are_freed():
    fed = Fed()
    fed.deploy()
    _, rid = fed.generate()
    fed.send(VERIFIER, p.Heartbeat())
    fed.send(DRAFTER, p.Heartbeat())
    out = fed.tick(2.1)  # one beat short of the 3 s window
    refusal = error(out)
    assert refusal.code == "client_lost" and one(out.to(VERIFIER), p.Release).req_id == rid
    status = fed.status()
    assert status.clients_lost == 1 and status.cancelled == 1


def test_a_verifiers_failing_pass_ends_the_request_and_a_drafts_detaches_it():
    fed = Fed()
    fed.deploy()
    _, rid = fed.generate(max_new_tokens=8)
    commit_two(fed, rid)
    out = fed.send(DRAFTER, p.Failed(req_id=rid, message="draft pass failed"))
    assert out.messages == {} and fed.core.requests[rid].draft is None
    assert DRAFTER not in fed.send(DRAFTER, p.Heartbeat()).messages  # no draft joins it again
    out = fed.send(VERIFIER, p.Failed(req_id=rid, message="verify pass failed: out of memory"))
    refusal = error(out)
    assert refusal.code == "internal" and "out of memory" in refusal.message and refusal.token_ids == [40, 41]
    assert one(out.to(VERIFIER), p.Release).req_id == rid and fed.status().failed == {"internal": 1}


def test_an_unhealthy_verifier_hands_its_requests_on():
    fed = Fed()
    fed.deploy(draft=False)
    fed.send(OTHER_VERIFIER, register("verify", max_batch=1))
    _, rid = fed.generate()
    owner = fed.core.requests[rid].verifier
    spare = OTHER_VERIFIER if owner == VERIFIER else VERIFIER
    out = fed.send(owner, p.Heartbeat(healthy=False))
    assert one(out.to(spare), p.Assign).req_id == rid and fed.status().unhealthy == 1


def test_a_restarted_coordinator_is_a_new_instance_and_its_workers_must_register_again():
    fed = Fed()
    fed.deploy()
    _, rid = fed.generate()
    commit_two(fed, rid)
    before = one(fed.send(CLIENT, p.Ping()).to(CLIENT), p.Pong).instance
    down = fed.core.shutdown(fed.now)
    refusal = error(down)
    assert refusal.code == "shutdown" and refusal.token_ids == [40, 41]

    fed.core = Core(fed.core.cfg, VOCAB)
    assert one(fed.send(CLIENT, p.Ping()).to(CLIENT), p.Pong).instance != before  # the client's cue to fail over
    assert error(fed.send(VERIFIER, p.Heartbeat()), VERIFIER).code == "unknown_worker"
    assert error(fed.send(VERIFIER, p.Verdict(req_id=rid, start=2, token_ids=[9], proposed=0, accepted=0, epoch=0,
                                              lookahead=4)), VERIFIER).message == "register first"


def test_a_bug_in_a_handler_ends_only_the_request_it_was_handling(monkeypatch, caplog):
    fed = Fed()
    fed.deploy()
    monkeypatch.setattr(fed.core, "handlers", {**fed.core.handlers, p.Cancel: lambda *_: 1 / 0})
    fed.generate()
    _, rid2 = fed.generate(req_id="r2")
    with caplog.at_level(logging.ERROR):
        out = fed.send(CLIENT, p.Cancel(req_id="r1"))
    assert error(out).code == "internal" and "ZeroDivisionError" in caplog.text
    assert (CLIENT, "r1") not in fed.core.by_client and rid2 in fed.core.requests


def test_a_stale_or_out_of_range_message_from_a_worker_is_counted_not_applied():
    fed = Fed()
    fed.deploy()
    _, rid = fed.generate(max_new_tokens=8)
    commit_two(fed, rid)
    fed.send(VERIFIER, p.Verdict(req_id=rid, start=0, token_ids=[40, 41], proposed=0, accepted=0, epoch=0,
                                 lookahead=4))  # a duplicate
    bad = fed.send(VERIFIER, p.Verdict(req_id=rid, start=2, token_ids=[999], proposed=0, accepted=0, epoch=0,
                                       lookahead=4))
    assert error(bad, VERIFIER).code == "invalid_verdict"
    assert error(fed.send(VERIFIER, p.Propose(req_id=rid, epoch=1, pos=2, token_ids=[3])), VERIFIER).code == \
        "wrong_role"
    assert fed.core.requests[rid].seq.committed == [40, 41]
    assert fed.status().rejected == {"stale": 1, "invalid_verdict": 1, "wrong_role": 1}


def test_an_undecodable_frame_is_counted_and_answered():
    fed = Fed()
    out = fed.core.refused(CLIENT, p.ProtocolError("bad_frame", "not msgpack", req_id="r9"), fed.now)
    assert error(out).req_id == "r9" and fed.status().rejected == {"bad_frame": 1}
