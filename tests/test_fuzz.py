"""Fuzzing the decoder: any bytes, and any msgpack value, either decode to a valid message or raise ProtocolError,
nothing else: an exception of any other type would end a receive loop."""
import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from amusd_mq.wire import protocol as p

FUZZ = settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1) | st.floats() | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)


scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1) | st.floats()
           | st.text(max_size=8) | st.binary(max_size=8)
           | st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=8))
           | st.builds(msgpack.Timestamp, st.integers(0, 2**32 - 1), st.integers(0, 999_999_999)))
keys = st.sampled_from(["v", "t", "req_id", "token_ids", "prompt"]) | scalars.filter(lambda k: k == k)  # no NaN
anything = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
                        max_leaves=16)


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


@FUZZ
@given(st.dictionaries(keys, anything, max_size=6), anything, anything)
def test_any_msgpack_map(body, version, kind):
    """Any key types (text, binary, ints, mixed), any values for "v" and "t", extension types, huge ints."""
    for frame in (body, {**body, "v": version, "t": kind}, {**body, "v": p.PROTOCOL_VERSION, "t": kind}):
        decode_or_reject(msgpack.packb(frame))


@FUZZ
@given(anything)
def test_any_msgpack_value(value):
    decode_or_reject(msgpack.packb(value))


def test_deep_nesting_is_refused():
    nested = b"\x81\xa1t" * 100_000 + b"\xc0"  # {"t": {"t": ... None}} 100,000 deep
    decode_or_reject(b"\x82\xa1v" + msgpack.packb(p.PROTOCOL_VERSION) + b"\xa1t" + nested)
    decode_or_reject(b"\x91" * 100_000 + b"\x00")  # [[[...0]]]
