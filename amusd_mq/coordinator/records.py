"""What the coordinator's core knows of each worker and each request, as plain records it alone mutates."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..sampling import Sampling
from ..sequence import Sequence
from ..text.detokenize import TextStream
from ..wire import protocol as p


@dataclass
class WorkerRecord:
    identity: bytes
    info: p.Register
    last_seen: float
    requests: set[str] = field(default_factory=set)  # at most info.max_batch
    reach: int | None = None  # a verifier's: how far its latest verdict asked the draft to run ahead
    # The latest: whether its model thread is in a forward pass, and how many passes it has finished.
    beat: p.Heartbeat = field(default_factory=p.Heartbeat)


@dataclass
class Request:
    rid: str  # the coordinator's id, used with workers
    client: bytes
    client_req_id: str
    seq: Sequence
    lookahead: int  # the request's cap on draft tokens past the committed end; reach never exceeds it
    policy: str
    sampling: Sampling
    text: TextStream
    reach: int  # how far ahead its verifier last asked the draft to run
    published_reach: int | None = None  # the reach its latest published Commit carried
    verifier: bytes | None = None
    draft: bytes | None = None
    orphaned: float | None = None  # when its verifier was lost, until another takes over
    draftless: bool = False  # a draft's passes failed with it: no draft joins it again
    progress: float = 0.0  # when its verifier was last assigned it or last committed
    stalled_at: int | None = None  # the verifier's pass count when it was last found making no progress
    resent_epoch: int = 0  # the epoch of the latest resend: verdicts of older epochs come from before it

    @property
    def key(self) -> tuple[bytes, str]:
        """How its client names it."""
        return self.client, self.client_req_id


@dataclass(frozen=True)
class Held:
    """A request that came while no verify worker was registered: it waits for one, up to queue_timeout_s."""
    client: bytes
    msg: p.Generate
    since: float


@dataclass(frozen=True)
class Admitted:
    """A request let in, with what was checked before its prompt is tokenized."""
    client: bytes
    msg: p.Generate
    rid: str
    info: p.Register  # the serving verify model's registration
    lookahead: int
    sampling: Sampling

    @property
    def key(self) -> tuple[bytes, str]:
        return self.client, self.msg.req_id
