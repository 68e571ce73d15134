"""Fuzzing the decoder: any bytes either decode to a valid message or raise ProtocolError, nothing else."""
import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from amusd_mq import protocol as p

FUZZ = settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1) | st.floats() | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)


def decode_or_reject(frame: bytes) -> None:
    try:
        msg = p.decode(frame, 1 << 16)
    except p.ProtocolError as exc:
        assert exc.kind in {"oversized", "malformed", "version", "unknown_type", "field"}
        return
    assert p.decode(p.encode(msg), 1 << 16) == msg  # whatever is accepted is well-formed


@FUZZ
@given(st.binary(max_size=256))
def test_random_bytes(frame):
    decode_or_reject(frame)


@FUZZ
@given(st.sampled_from(sorted(p.MESSAGES)), st.dictionaries(st.sampled_from(
    ["req_id", "epoch", "pos", "token_ids", "start", "seq", "committed", "max_new_tokens", "prompt", "prompt_ids",
     "role", "tokenizer", "stats", "done", "x"]), values, max_size=8))
def test_plausible_messages_with_random_fields(kind, body):
    decode_or_reject(msgpack.packb({"v": p.PROTOCOL_VERSION, "t": kind, **body}))
