"""Every message of the system: typed dataclasses, one msgpack encoding, strict validation on receipt.

A frame is one msgpack map: {"v": PROTOCOL_VERSION, "t": <type>, <field>: <value>, ...}. Field types come
from the dataclass annotations and are checked exactly (no coercion, no unknown or missing fields); every
integer must lie in [0, 2**63). A `batch` frame carries several messages for one receiver, each a map with its
own "t" and checked by the same rules. docs/protocol.md describes who sends each message on which socket.
"""
from __future__ import annotations

import math
import re
import reprlib
import types
import typing
from dataclasses import MISSING, dataclass, field, fields
from typing import Callable, ClassVar, Union

import msgpack

from .codes import Code, Mode, Policy

PROTOCOL_VERSION = 5
INT_LIMIT = 1 << 63
HEAD_BYTES = 1024  # where a refused frame's request id is looked for


class ProtocolError(ValueError):
    """A frame that can't be accepted. `kind` names the rule it broke, for counters and error replies; `req_id` is
    the request the frame belongs to, where its head names one, so that the refusal reaches that request."""

    def __init__(self, kind: str, message: str, req_id: str | None = None):
        super().__init__(message)
        self.kind = kind
        self.req_id = req_id


@dataclass
class Message:
    TYPE: ClassVar[str] = ""


MESSAGES: dict[str, type[Message]] = {}


@dataclass(frozen=True)
class _Field:
    name: str
    type: object
    required: bool
    check: Callable[[object], bool]  # built once from the annotation: decoding calls it for every message


_FIELDS: dict[type[Message], tuple[_Field, ...]] = {}


def message(cls):
    cls = dataclass(cls)
    MESSAGES[cls.TYPE] = cls
    hints = typing.get_type_hints(cls)
    _FIELDS[cls] = tuple(_Field(f.name, hints[f.name], f.default is MISSING and f.default_factory is MISSING,
                                _checker(hints[f.name])) for f in fields(cls))
    return cls


def _checker(tp) -> Callable[[object], bool]:
    """Whether a decoded value has exactly type tp: no coercion, ints in [0, 2**63), finite floats."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        options = [_checker(arg) for arg in typing.get_args(tp)]
        return lambda value: any(check(value) for check in options)
    if origin is list:
        (arg,) = typing.get_args(tp)
        if arg is int:  # token lists can hold millions: check them in C, not one call per element
            return lambda value: type(value) is list and (not value or set(map(type, value)) == {int} and min(
                value) >= 0 and max(value) < INT_LIMIT)
        item = _checker(arg)
        return lambda value: type(value) is list and all(item(v) for v in value)
    if origin is dict:
        key, val = (_checker(arg) for arg in typing.get_args(tp))
        return lambda value: type(value) is dict and all(key(k) and val(v) for k, v in value.items())
    if tp is int:
        return lambda value: type(value) is int and 0 <= value < INT_LIMIT
    if tp is float:
        return lambda value: type(value) is float and math.isfinite(value)
    if tp is type(None):
        return lambda value: value is None
    if tp is str:  # a code or mode of our own is a StrEnum: it encodes as its string
        return lambda value: isinstance(value, str)
    return lambda value: type(value) is tp


# Client <-> coordinator (DEALER -> ROUTER)

# A client names each of its requests, generations and calls alike, with a `req_id` of its own choosing, first
# among the fields: the answers carry it, and so does the refusal of a frame too large or too broken to read, which
# the coordinator takes from the frame's head.

@message
class Hello(Message):
    """Client handshake; answered by Welcome."""
    TYPE = "hello"
    req_id: str


@message
class Welcome(Message):
    TYPE = "welcome"
    req_id: str
    instance: str  # this run of the coordinator: a client seeing another one knows its requests were lost
    model: str  # the verify model it serves, as configured
    verifiers: int
    drafts: int
    vocab_size: int
    max_context: int
    eos_token_ids: list[int]
    heartbeat_s: float  # a client pings this often while it has requests in flight, or they are cancelled
    max_message_bytes: int  # the largest frame the coordinator accepts: a client refuses a larger request itself


@message
class Generate(Message):
    TYPE = "generate"
    req_id: str
    max_new_tokens: int
    prompt: str | None = None
    prompt_ids: list[int] | None = None
    messages: list[dict[str, str]] | None = None  # a chat, rendered with the verify model's chat template
    stop_token_ids: list[int] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)  # stop strings: the text ends before the first one to appear
    ignore_eos: bool = False
    lookahead: int | None = None
    policy: str = Policy.EAGER  # or amusd: the original's verifier, waiting for 2 proposals (codes.Policy)
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None  # the coordinator picks one when absent
    sampling_mode: str | None = None  # "greedy", "seeded" or "exact"; absent: greedy at temperature 0, else exact


@message
class Tokens(Message):
    """Newly committed tokens of a request, in order; `start` is the index of the first one."""
    TYPE = "tokens"
    req_id: str
    start: int
    token_ids: list[int]
    text: str


@message
class Done(Message):
    TYPE = "done"
    req_id: str
    finish_reason: str
    prompt_ids: list[int]
    stats: dict[str, Union[int, float, str]]


@message
class Error(Message):
    """A refusal or failure. `token_ids` carries what was committed before a request failed."""
    TYPE = "error"
    code: str
    message: str
    req_id: str | None = None
    token_ids: list[int] = field(default_factory=list)


@message
class Cancel(Message):
    TYPE = "cancel"
    req_id: str


@message
class Ping(Message):
    """A client's heartbeat while it has requests in flight, and its check that the coordinator is the same run."""
    TYPE = "ping"


@message
class Pong(Message):
    TYPE = "pong"
    instance: str


@message
class Status(Message):
    TYPE = "status"
    req_id: str


@message
class StatusReply(Message):
    TYPE = "status_reply"
    req_id: str
    verifiers: int
    drafts: int
    queued: int
    active: int
    rejected: dict[str, int]
    served: int  # requests that ran to their end
    cancelled: int  # by their client, or because their client went silent
    clients_lost: int  # clients that went silent with requests in flight
    failed: dict[str, int]  # requests that ended in an error after they were let in, by its code
    unhealthy: int  # workers registered but reporting themselves unhealthy, counted in neither verifiers nor drafts


# Worker <-> coordinator (DEALER -> ROUTER)

@message
class Register(Message):
    TYPE = "register"
    role: str  # "draft" or "verify"
    model: str
    runner: str  # what computes its forward passes: "native" or "hf" (or a benchmark's stand-in)
    kernels: str  # what computes its linear layers: path/rows ("onednn/4"), or each role's ("qkv=onednn/4,o=aten/2")
    vocab_size: int
    vocab_hash: str
    max_context: int
    eos_token_ids: list[int]
    max_batch: int  # requests it serves at once; the coordinator assigns it no more


@message
class Registered(Message):
    """Accepts a worker, and sets its heartbeat: every `heartbeat_s`, and the coordinator presumed dead after
    `liveness` of them in silence, as the coordinator itself judges its workers."""
    TYPE = "registered"
    seq: int
    heartbeat_s: float
    liveness: int


@message
class Heartbeat(Message):
    """Sent both ways. A worker's tells whether its model thread is in a forward pass and how many it has
    finished, so a hung pass is told apart from lost messages or an idle worker."""
    TYPE = "heartbeat"
    busy: bool = False
    passes: int = 0
    healthy: bool = True  # a worker's: false while its passes fail whatever they hold; it is then given no work


@message
class Failed(Message):
    """A worker's passes fail whenever this request is in them (found by running a failed pass again in parts), and
    it has dropped it. A verifier's ends the request with an `internal` error; a draft's leaves it to the verifier."""
    TYPE = "failed"
    req_id: str
    message: str


@message
class Assign(Message):
    """Serve a request. Carries a snapshot of its canonical state, so a worker can join late."""
    TYPE = "assign"
    req_id: str
    prompt_ids: list[int]
    committed: list[int]
    epoch: int
    max_new_tokens: int
    stop_token_ids: list[int]
    lookahead: int  # draft tokens past the committed end: the request's cap to a verifier, its reach to a draft
    policy: str
    sampling_mode: str = Mode.GREEDY
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0


@message
class Propose(Message):
    """Draft tokens for positions pos, pos+1, ... built on the canonical prefix of `epoch`. In exact sampling
    mode, each token comes with the sparse distribution it was drawn from (ids and probabilities)."""
    TYPE = "propose"
    req_id: str
    epoch: int
    pos: int
    token_ids: list[int]
    q_ids: list[list[int]] = field(default_factory=list)
    q_probs: list[list[float]] = field(default_factory=list)


@message
class Verdict(Message):
    """The verifier's decision: `token_ids` extend the committed sequence at `start`."""
    TYPE = "verdict"
    req_id: str
    start: int
    token_ids: list[int]
    proposed: int
    accepted: int
    epoch: int  # the newest the verifier knew of: after a resend, tells its old verdicts from its new ones
    lookahead: int  # how far the draft should now run ahead for this request: what the verifier's next passes use
    rows: int = 1  # requests the pass verified together
    step_ms: float = 0.0  # the forward pass's own time, so the coordinator can report verifier utilisation


@message
class Release(Message):
    TYPE = "release"
    req_id: str


@message
class SnapshotRequest(Message):
    TYPE = "snapshot_request"
    req_id: str


@message
class Snapshot(Message):
    TYPE = "snapshot"
    req_id: str
    seq: int
    epoch: int
    committed: list[int]
    done: bool


# Coordinator PUB -> worker SUB (Clone pattern: global sequence numbers; a gap asks for a Snapshot)

@message
class Commit(Message):
    """Canonical tokens appended at `start`, and the epoch after them; a higher epoch is a rollback point."""
    TYPE = "commit"
    seq: int
    req_id: str
    epoch: int
    start: int
    token_ids: list[int]
    done: bool
    lookahead: int  # the verifier's latest wish for how far the draft runs ahead


@message
class Beat(Message):
    """Published every heartbeat so subscribers notice a lost last update."""
    TYPE = "beat"
    seq: int


@message
class Batch(Message):
    """Several messages for one receiver in one frame, in order: what one forward pass produced for many
    requests. A batch holds no batch."""
    TYPE = "batch"
    messages: list[Message]


def encode(msg: Message) -> bytes:
    body = {"messages": [_body(m) for m in msg.messages]} if isinstance(msg, Batch) else _values(msg)
    return msgpack.packb({"v": PROTOCOL_VERSION, "t": msg.TYPE, **body})


BATCH_HEAD = 32  # bytes of a batch frame besides its messages' bodies: the map, v, t and the array's header


def encode_all(msgs: list[Message], limit: int) -> list[tuple[list[Message], bytes]]:
    """Frames for messages to one receiver, in order, each with the messages it holds: as few batches as fit
    `limit` each, every body packed once (a message larger than the limit alone still makes a frame of its own)."""
    if len(msgs) == 1:
        return [(msgs, encode(msgs[0]))]
    frames, group, size = [], [], BATCH_HEAD
    for msg in msgs:
        body = msgpack.packb(_body(msg))
        if group and size + len(body) > limit:
            frames.append(_batch_frame(group))
            group, size = [], BATCH_HEAD
        group.append((msg, body))
        size += len(body)
    frames.append(_batch_frame(group))
    return frames


def _batch_frame(group: list[tuple[Message, bytes]]) -> tuple[list[Message], bytes]:
    """The bytes `encode(Batch(...))` writes, from bodies already packed; a lone message as itself."""
    msgs = [msg for msg, _ in group]
    if len(group) == 1:
        return msgs, encode(msgs[0])
    head = msgpack.Packer()
    frame = head.pack_map_header(3) + head.pack("v") + head.pack(PROTOCOL_VERSION) + head.pack("t") + head.pack(
        Batch.TYPE) + head.pack("messages") + head.pack_array_header(len(group))
    return msgs, frame + b"".join(body for _, body in group)


def _body(msg: Message) -> dict:
    return {"t": msg.TYPE, **_values(msg)}


def _values(msg: Message) -> dict:
    """Its fields, shallow: every value is already what msgpack writes (asdict's deep copy cost more than the
    packing)."""
    return {f.name: getattr(msg, f.name) for f in _FIELDS[type(msg)]}


def decode(frame: bytes, max_bytes: int) -> Message:
    """The message a frame holds, or ProtocolError: whatever the bytes, nothing else can come out of here."""
    try:
        if len(frame) > max_bytes:
            raise ProtocolError(Code.OVERSIZED, f"frame of {len(frame)} bytes exceeds the limit of {max_bytes}")
        try:
            return _decode(frame)
        except ProtocolError:
            raise
        except Exception as exc:  # a rule this decoder forgot: still a refused frame, never a dead receive loop
            raise ProtocolError(Code.MALFORMED, f"undecodable frame ({type(exc).__name__}: {exc})") from None
    except ProtocolError as exc:
        exc.req_id = _head_req_id(frame)
        raise


def _head_req_id(frame: bytes) -> str | None:
    """The request id at the head of a frame that can't be accepted, read from its first bytes only: `encode` writes
    the version, the type and then the fields in order, and every message of a client's request has its req_id
    first."""
    head = msgpack.Unpacker(raw=False, max_buffer_size=HEAD_BYTES)
    head.feed(frame[:HEAD_BYTES])
    try:
        for _ in range(min(head.read_map_header(), 3)):
            key, value = head.unpack(), head.unpack()
            if key == "req_id":
                return value if type(value) is str else None
    except Exception:  # anything short of a readable head names no request
        pass
    return None


def _decode(frame: bytes) -> Message:
    try:
        body = msgpack.unpackb(frame, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types for garbage
        raise ProtocolError(Code.MALFORMED, f"not msgpack: {exc}") from None
    if not isinstance(body, dict):
        raise ProtocolError(Code.MALFORMED, "frame is not a msgpack map")
    if not all(type(k) is str for k in body):
        raise ProtocolError(Code.MALFORMED, "map keys must be strings")
    version = body.pop("v", None)
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise ProtocolError(Code.VERSION, f"protocol version {version!r}, expected {PROTOCOL_VERSION}")
    if body.get("t") == Batch.TYPE:
        inner = body.pop("messages", None)
        if set(body) != {"t"} or type(inner) is not list or not all(type(m) is dict for m in inner):
            raise ProtocolError(Code.FIELD, "batch: expected exactly a list of message maps in 'messages'")
        return Batch([_message(m) for m in inner])
    return _message(body)


def _message(body: dict) -> Message:
    kind = body.pop("t", None)
    cls = MESSAGES.get(kind) if type(kind) is str and kind != Batch.TYPE else None
    if cls is None:
        raise ProtocolError(Code.UNKNOWN_TYPE, "unknown message type")
    known = _FIELDS[cls]
    if len(body) > len(known) or not set(body) <= {f.name for f in known}:
        raise ProtocolError(Code.FIELD, f"{cls.TYPE}: unknown fields {sorted(set(body) - {f.name for f in known})}")
    missing = [f.name for f in known if f.required and f.name not in body]
    if missing:
        raise ProtocolError(Code.FIELD, f"{cls.TYPE}: missing field {missing[0]!r}")
    msg = cls(**body)
    wrong = wrong_field(msg)
    if wrong:
        raise ProtocolError(Code.FIELD, wrong)
    return msg


def wrong_field(msg: Message) -> str | None:
    """The first field whose value breaks its type, as decoding would find it, or None: a message built here is
    checked by the same rules before it travels."""
    for f in _FIELDS[type(msg)]:
        if not f.check(getattr(msg, f.name)):
            return f"{msg.TYPE}.{f.name}: expected {_name(f.type)}, not {reprlib.repr(getattr(msg, f.name))}"
    return None


def _name(tp) -> str:
    """A type as the errors name it; an int is always one in [0, 2**63)."""
    name = tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")
    return re.sub(r"\bint\b", "int in [0, 2**63)", name)
