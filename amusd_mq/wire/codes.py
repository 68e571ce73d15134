"""The names that travel on the wire, each defined once: error codes, sampling modes, speculation policies and the
services' roles. Each is a StrEnum, so a member encodes as its string and a decoded string compares (and hashes)
equal to it: messages keep plain `str` fields, and code compares them with these members."""
from enum import StrEnum


class Role(StrEnum):
    COORDINATOR = "coordinator"
    DRAFT = "draft"
    VERIFY = "verify"
    GATEWAY = "gateway"
    CLIENT = "client"


class Mode(StrEnum):
    """How a request samples: greedy, seeded (the verify model's own sample for a seed, token for token), or exact
    (its output distribution, by rejection sampling)."""
    GREEDY = "greedy"
    SEEDED = "seeded"
    EXACT = "exact"


class Policy(StrEnum):
    """When the verifier checks a request's proposals: as soon as any wait, as deep as its cost line says (eager,
    the default), or once two do, all of them up to the request's cap, as the original AMUSD's verifier did (amusd).
    Both are supported policies on the wire, so that a benchmark compares the two schedules through the very same
    services; amusd waits at most the liveness window, so a dead draft can't stall it."""
    EAGER = "eager"
    AMUSD = "amusd"


class Code(StrEnum):
    """Why a frame was refused or a request ended (`Error.code`), and what the refusal counters count."""
    # a frame that can't be accepted, as decoding finds it
    MALFORMED = "malformed"
    VERSION = "version"
    UNKNOWN_TYPE = "unknown_type"
    FIELD = "field"
    OVERSIZED = "oversized"
    UNEXPECTED_TYPE = "unexpected_type"
    # a peer the CURVE allow-list or handshake refuses
    NOT_ALLOWED = "not_allowed"
    HANDSHAKE_FAILED = "handshake_failed"
    # a request refused, or ended without finishing
    INVALID_REQUEST = "invalid_request"
    QUEUE_FULL = "queue_full"
    TOO_MANY_REQUESTS = "too_many_requests"
    NO_WORKER = "no_worker"
    WORKER_LOST = "worker_lost"
    CLIENT_LOST = "client_lost"
    SHUTDOWN = "shutdown"
    INTERNAL = "internal"
    COORDINATOR_RESTARTED = "coordinator_restarted"  # the client's own: the coordinator forgot its requests
    # a worker's message refused, or a late one dropped
    INVALID_REGISTER = "invalid_register"
    VOCAB_MISMATCH = "vocab_mismatch"
    UNKNOWN_WORKER = "unknown_worker"
    WRONG_ROLE = "wrong_role"
    STALE = "stale"
    INVALID_PROPOSAL = "invalid_proposal"
    INVALID_VERDICT = "invalid_verdict"
    # a worker's own refusals and failures
    INVALID_ASSIGN = "invalid_assign"
    OVER_CAPACITY = "over_capacity"
    PASS_FAILED = "pass_failed"
