import timeit

import msgpack
import pytest

from amusd_mq.wire import protocol as p

SAMPLES = [
    p.Hello(req_id="h"), p.Welcome(req_id="h", instance="i", model="m", verifiers=1, drafts=2, vocab_size=100,
                                   max_context=2048, eos_token_ids=[2], heartbeat_s=1.0, max_message_bytes=1 << 22),
    p.Generate(req_id="r", max_new_tokens=5, prompt="hi"), p.Generate(req_id="r", max_new_tokens=5, prompt_ids=[1, 2]),
    p.Generate(req_id="r", max_new_tokens=5, messages=[{"role": "user", "content": "hi"}], stop=["\n\n"]),
    p.Tokens(req_id="r", start=3, token_ids=[4, 5], text="ab"),
    p.Done(req_id="r", finish_reason="stop", prompt_ids=[1], stats={"a": 1, "b": 0.5}),
    p.Error(code="x", message="y"), p.Cancel(req_id="r"), p.Ping(), p.Pong(instance="i"), p.Status(req_id="s"),
    p.StatusReply(req_id="s", verifiers=1, drafts=0, queued=2, active=1, rejected={"malformed": 3}, served=4, cancelled=1,
                  clients_lost=0, failed={"internal": 1}, unhealthy=0),
    p.Register(role="verify", model="m", runner="native", kernels="onednn", vocab_size=9, vocab_hash="h", max_context=8,
               eos_token_ids=[], max_batch=4),
    p.Registered(seq=3, heartbeat_s=1.0, liveness=5), p.Heartbeat(), p.Failed(req_id="r", message="m"),
    p.Assign(req_id="r", prompt_ids=[1], committed=[2], epoch=1, max_new_tokens=4, stop_token_ids=[], lookahead=3,
             policy="eager"),
    p.Propose(req_id="r", epoch=0, pos=0, token_ids=[7]),
    p.Verdict(req_id="r", start=0, token_ids=[7, 8], proposed=3, accepted=1, epoch=0, lookahead=2),
    p.Release(req_id="r"),
    p.SnapshotRequest(req_id="r"), p.Snapshot(req_id="r", seq=1, epoch=0, committed=[], done=False),
    p.Commit(seq=1, req_id="r", epoch=0, start=0, token_ids=[1], done=True, lookahead=0), p.Beat(seq=9),
    p.Batch([p.Tokens(req_id="r", start=3, token_ids=[4, 5], text="ab"), p.Cancel(req_id="q"), p.Ping()]),
]


def test_every_message_type_has_a_sample():
    assert {type(m) for m in SAMPLES} == set(p.MESSAGES.values())


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: m.TYPE)
def test_round_trip(msg):
    assert p.decode(p.encode(msg), 1 << 20) == msg


def raw(**body):
    return msgpack.packb({"v": p.PROTOCOL_VERSION, **body})


@pytest.mark.parametrize("frame,kind", [
    (b"\xc1garbage", "malformed"),
    (msgpack.packb([1, "hello"]), "malformed"),
    (msgpack.packb({"v": 99, "t": "hello"}), "version"),
    (msgpack.packb({"t": "hello"}), "version"),
    (msgpack.packb({"v": True, "t": "hello"}), "version"),  # no coercion, not even for the version
    (msgpack.packb({"v": float(p.PROTOCOL_VERSION), "t": "hello"}), "version"),
    (raw(t=[1]), "unknown_type"),  # an unhashable type field
    (raw(t=b"hello"), "unknown_type"),
    (msgpack.packb({"v": p.PROTOCOL_VERSION, "t": "hello", b"x": 1}), "malformed"),  # text and binary keys
    (msgpack.packb({1: 2}), "malformed"),
    (raw(t="cancel", req_id=["r"]), "field"),
    (raw(t="launch_missiles"), "unknown_type"),
    (raw(t="cancel"), "field"),  # missing req_id
    (raw(t="cancel", req_id="r", extra=1), "field"),
    (raw(t="cancel", req_id=5), "field"),
    (raw(t="propose", req_id="r", epoch=-1, pos=0, token_ids=[1]), "field"),
    (raw(t="propose", req_id="r", epoch=0, pos=0, token_ids=[1, "x"]), "field"),
    (raw(t="propose", req_id="r", epoch=True, pos=0, token_ids=[1]), "field"),
    (raw(t="propose", req_id="r", epoch=0, pos=0, token_ids=[2**63]), "field"),
    (raw(t="registered", seq=0, heartbeat_s=float("nan")), "field"),
    (raw(t="done", req_id="r", finish_reason="stop", prompt_ids=[], stats={"a": [1]}), "field"),
    (raw(t="batch", messages=[{"t": "batch", "messages": []}]), "unknown_type"),  # a batch holds no batch
    (raw(t="batch", messages=[{"t": "cancel", "req_id": 5}]), "field"),  # each message checked as if alone
    (raw(t="batch", messages=[{"t": "ping"}], extra=1), "field"),
    (raw(t="batch", messages=[[1]]), "field"),
    (raw(t="batch"), "field"),
])
def test_rejects_bad_frames(frame, kind):
    with pytest.raises(p.ProtocolError) as err:
        p.decode(frame, 1 << 20)
    assert err.value.kind == kind


def test_token_lists_are_checked_fast_and_exactly():
    """prompt_ids may hold millions of ids: checking them costs a few times what unpacking them does (it was 75
    times as much, seconds on the event loop), and still refuses bools, floats and negatives."""
    big = raw(t="generate", req_id="r", max_new_tokens=1, prompt_ids=[7] * 2_000_000)
    unpack = min(timeit.repeat(lambda: msgpack.unpackb(big), number=1, repeat=3))
    decode = min(timeit.repeat(lambda: p.decode(big, 1 << 24), number=1, repeat=3))
    assert decode < 10 * unpack, (decode, unpack)
    for bad in ([1, True], [1, 2.0], [1, -1], [1, 2**63], [[1]]):
        with pytest.raises(p.ProtocolError):
            p.decode(raw(t="generate", req_id="r", max_new_tokens=1, prompt_ids=bad), 1 << 20)


def test_rejects_oversized_frames():
    frame = p.encode(p.Propose(req_id="r", epoch=0, pos=0, token_ids=list(range(1000))))
    assert p.decode(frame, len(frame)).token_ids == list(range(1000))
    with pytest.raises(p.ProtocolError) as err:
        p.decode(frame, len(frame) - 1)
    assert err.value.kind == "oversized"


def test_optional_fields_take_defaults():
    msg = p.decode(raw(t="generate", req_id="r", max_new_tokens=3, prompt="x"), 1 << 20)
    assert msg.prompt_ids is None and msg.stop_token_ids == [] and msg.lookahead is None


def test_messages_for_one_receiver_are_framed_within_the_limit_in_order():
    msgs = [p.Assign(req_id=f"r{i}", prompt_ids=list(range(1000 + i)), committed=[], epoch=0, max_new_tokens=4,
                     stop_token_ids=[], lookahead=3, policy="eager") for i in range(12)]
    limit = 10_000
    frames = p.encode_all(msgs, limit)
    assert len(frames) > 1 and all(len(frame) <= limit for _, frame in frames)
    decoded = []
    for inner, frame in frames:
        got = p.decode(frame, limit)
        assert frame == p.encode(inner[0] if len(inner) == 1 else p.Batch(inner))  # the bytes encode writes
        decoded += got.messages if isinstance(got, p.Batch) else [got]
    assert decoded == msgs
    assert p.encode_all(msgs[:3], 1 << 20) == [(msgs[:3], p.encode(p.Batch(msgs[:3])))]  # one frame, nearly always
