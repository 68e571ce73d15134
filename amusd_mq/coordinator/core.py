"""The coordinator's decisions, as a pure state machine: it owns every request's canonical sequence, pairs requests
with workers, relays proposals to the verifier, applies verdicts, publishes commit and rollback points, and streams
tokens to clients.

It owns no socket, never awaits and reads no clock: each call (a frame from a peer, a timer tick, a tokenized
prompt) takes the time it happens at and returns an `Out`, what the shell must send to whom and which prompts it
must tokenize on its thread. So every path a request can end by is tested by feeding it messages
(tests/coordinator/test_core.py).
"""
from __future__ import annotations

import logging
import secrets
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from .. import validate
from ..config import DRAFT, VERIFY, Config
from ..sampling import Sampling, proposal_problem
from ..sequence import Sequence
from ..text import vocab
from ..text.chat import ChatError
from ..text.detokenize import TextStream
from ..wire import protocol as p
from ..wire.codes import Code
from ..wire.transport import Rejects
from .admission import Admission, Refused
from .records import Admitted, Held, Request, WorkerRecord

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tokenize:
    """A prompt to tokenize off the event loop; its ids (or the exception `run` raised) go back to the core's
    `tokenized`."""
    rid: str
    msg: p.Generate
    vocab: vocab.Vocabulary

    def run(self) -> list[int]:
        if self.msg.messages is None:
            return self.vocab.tokenizer.encode(self.msg.prompt).ids
        return self.vocab.chat_ids(self.msg.messages)


@dataclass
class Out:
    """What one call into the core causes: messages by receiver (None: the PUB stream) in order, each receiver's
    to leave as one frame (a verify pass's verdicts become one commit frame and one tokens frame per client); the
    prompts to tokenize; and the tokenizations no longer wanted (their requests ended first)."""
    messages: dict[bytes | None, list[p.Message]] = field(default_factory=dict)
    tokenize: list[Tokenize] = field(default_factory=list)
    untokenize: list[str] = field(default_factory=list)

    def to(self, receiver: bytes | None) -> list[p.Message]:
        return self.messages.get(receiver, [])


class RequestError(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class Core:
    def __init__(self, cfg: Config, vocabulary: vocab.Vocabulary):
        self.cfg = cfg
        self.vocab = vocabulary
        self.workers: dict[bytes, WorkerRecord] = {}
        self.requests: dict[str, Request] = {}
        self.by_client: dict[tuple[bytes, str], str] = {}  # every admitted request, tokenizing ones included
        self.tokenizing: dict[str, Admitted] = {}
        self.held: dict[str, Held] = {}
        self.clients: dict[bytes, float] = {}  # when each client with requests in flight was last heard
        self.admission = Admission(cfg.max_queue, cfg.max_client_requests)
        self.rejects = Rejects()
        self.pub_seq = 0
        self.instance = uuid.uuid4().hex
        self.served = self.cancelled = self.clients_lost = 0
        self.failed: Counter[str] = Counter()  # requests that ended in an error after they were let in, by code
        self.handlers = {
            p.Hello: self.on_hello, p.Ping: self.on_ping, p.Status: self.on_status, p.Generate: self.on_generate,
            p.Cancel: self.on_cancel, p.Register: self.on_register, p.Heartbeat: self.on_heartbeat,
            p.Propose: self.on_propose, p.Verdict: self.on_verdict, p.SnapshotRequest: self.on_snapshot,
            p.Failed: self.on_failed,
        }
        self.now = 0.0  # the time of the call being handled
        self._out: Out | None = None

    # entry points: each returns what it causes

    def handle(self, sender: bytes, msgs: list[p.Message], now: float) -> Out:
        """A frame of messages from a peer on the ROUTER."""
        with self._call(now) as out:
            if sender in self.clients:
                self.clients[sender] = now
            for msg in msgs:
                self._handle(sender, msg)
        return out

    def refused(self, sender: bytes | None, exc: p.ProtocolError, now: float) -> Out:
        """A frame that decoded to no message: counted, and its sender told why when it can be."""
        with self._call(now) as out:
            self._reject(sender, exc.kind, str(exc), exc.req_id)
        return out

    def tick(self, now: float) -> Out:
        """Once a heartbeat: the beat, the workers' liveness, and every deadline a request or client has."""
        with self._call(now) as out:
            self._publish(p.Beat(seq=self.pub_seq))
            for w in list(self.workers.values()):
                if now - w.last_seen > self.cfg.heartbeat_expiry_s:
                    self._drop_worker(w, "missed heartbeats")
                else:
                    self._send(p.Heartbeat(), w.identity)
            for held in list(self.held.values()):
                if now - held.since > self.cfg.queue_timeout_s:
                    self._fail((held.client, held.msg.req_id), Code.NO_WORKER,
                               f"no verify worker registered within {self.cfg.queue_timeout_s:g}s")
            for req in list(self.requests.values()):
                if req.orphaned is not None and now - req.orphaned > self.cfg.failover_s:
                    self._fail(req.key, Code.WORKER_LOST, f"its verify worker was lost and no other took over "
                                                       f"within {self.cfg.failover_s:g}s")
                elif req.verifier is not None and now - req.progress > self.cfg.progress_timeout_s:
                    self._stalled(req)
            # Checked once a heartbeat: one beat short of the window, so a silent client's requests are freed
            # within the liveness window of its last message.
            silent = max(self.cfg.heartbeat_s, self.cfg.heartbeat_expiry_s - self.cfg.heartbeat_s)
            for client, seen in list(self.clients.items()):
                if now - seen > silent:
                    self._client_lost(client)
        return out

    def tokenized(self, rid: str, result: list[int] | Exception, now: float) -> Out:
        """A prompt's ids, or what tokenizing it raised; nothing if its request ended meanwhile."""
        with self._call(now) as out:
            admitted = self.tokenizing.pop(rid, None)
            if admitted is None:
                return out
            if isinstance(result, ChatError):
                self._refuse(admitted, RequestError(Code.INVALID_REQUEST, str(result)))
            elif isinstance(result, Exception):
                log.error("tokenizing a prompt failed", exc_info=result)
                self._refuse(admitted, RequestError(Code.INTERNAL, f"the prompt could not be tokenized: {result!r}"))
            else:
                self._enqueue(admitted, result)
        return out

    def shutdown(self, now: float) -> Out:
        """Every request still in flight ends, each client told with what it committed."""
        with self._call(now) as out:
            for key in list(self.by_client):
                self._fail(key, Code.SHUTDOWN, "the coordinator is shutting down")
        return out

    @contextmanager
    def _call(self, now: float) -> Iterator[Out]:
        self.now, self._out = now, Out()
        try:
            yield self._out
        finally:
            self._out = None

    def _handle(self, identity: bytes, msg: p.Message) -> None:
        handler = self.handlers.get(type(msg))
        req_id = getattr(msg, "req_id", None)  # so that a refusal reaches the request it is about
        if handler is None:
            self._reject(identity, Code.UNEXPECTED_TYPE, f"{msg.TYPE} is not accepted by the coordinator", req_id)
            return
        try:
            handler(identity, msg)
        except Exception:  # a bug in one handler must not take the service down
            log.exception("handling %s failed", msg.TYPE)
            if (identity, req_id) in self.by_client:  # it was let in: it ends, with what it committed
                self._fail((identity, req_id), Code.INTERNAL, f"internal error handling {msg.TYPE}")
            else:
                self._reject(identity, Code.INTERNAL, f"internal error handling {msg.TYPE}", req_id)

    def _stalled(self, req: Request) -> None:
        """No commit for a while: a forward pass that never ends is a dead verifier; otherwise a message was
        lost (an Assign, or the last Verdict) and the verifier is sent the request again."""
        w = self.workers[req.verifier]
        req.progress = self.now
        if w.beat.busy and req.stalled_at == w.beat.passes:
            self._drop_worker(w, f"no forward pass finished in {2 * self.cfg.progress_timeout_s:g}s")
            return
        req.stalled_at = w.beat.passes
        self._resend(req, "no progress")

    def _resend(self, req: Request, why: str) -> None:
        """Start the verifier over from the canonical state: what it holds beyond it was lost in transit. The
        Assign's newer epoch makes the worker replace what it holds (no separate Release to lose or reorder)."""
        log.warning("resending request %s to its verifier: %s", req.rid, why)
        req.seq.resync()
        req.resent_epoch = req.seq.epoch
        self._assign(req, req.verifier)
        if req.draft is not None:  # its Assign may have been lost too
            self._assign(req, req.draft)
        self._commit(req, len(req.seq.committed), [])

    def _reject(self, identity: bytes | None, kind: str, detail: str, req_id: str | None = None) -> None:
        self.rejects.add(kind, detail)
        if identity is not None:
            self._send(p.Error(code=kind, message=detail, req_id=req_id), identity)

    def _send(self, msg: p.Message, receiver: bytes | None) -> None:
        """To a peer on the ROUTER, or on PUB (receiver None)."""
        self._out.messages.setdefault(receiver, []).append(msg)

    def _publish(self, msg: p.Message) -> None:
        self._send(msg, None)

    # clients

    def _verifiers(self) -> list[WorkerRecord]:
        """The verify workers that can serve: an unhealthy one is registered but given no work."""
        return [w for w in self.workers.values() if w.info.role == VERIFY and w.beat.healthy]

    def _drafts(self) -> list[WorkerRecord]:
        return [w for w in self.workers.values() if w.info.role == DRAFT and w.beat.healthy]

    def on_hello(self, identity: bytes, msg: p.Hello) -> None:
        verifiers = self._verifiers()
        ref = verifiers[0].info if verifiers else None
        self._send(p.Welcome(
            req_id=msg.req_id, max_message_bytes=self.cfg.max_message_bytes, instance=self.instance,
            model=self.cfg.verify_model, verifiers=len(verifiers), drafts=len(self._drafts()),
            vocab_size=ref.vocab_size if ref else 0, max_context=ref.max_context if ref else 0,
            eos_token_ids=ref.eos_token_ids if ref else [], heartbeat_s=self.cfg.heartbeat_s), identity)

    def on_ping(self, identity: bytes, msg: p.Ping) -> None:
        self._send(p.Pong(instance=self.instance), identity)

    def on_status(self, identity: bytes, msg: p.Status) -> None:
        self._send(p.StatusReply(
            req_id=msg.req_id, verifiers=len(self._verifiers()), drafts=len(self._drafts()),
            queued=self.admission.waiting, active=sum(1 for r in self.requests.values() if r.verifier),
            rejected=dict(self.rejects.counts), served=self.served, cancelled=self.cancelled,
            clients_lost=self.clients_lost, failed=dict(self.failed),
            unhealthy=sum(not w.beat.healthy for w in self.workers.values())), identity)

    def on_generate(self, identity: bytes, msg: p.Generate) -> None:
        """Admit a request. While no verify worker is registered it is held, waiting for one."""
        key = (identity, msg.req_id)
        try:
            if key in self.by_client:
                raise RequestError(Code.INVALID_REQUEST, f"request id {msg.req_id!r} is already in flight")
            if not self._verifiers() and self.cfg.queue_timeout_s == 0:
                raise RequestError(Code.NO_WORKER, "no verify worker is registered with the coordinator")
            self.admission.admit(identity)
        except (RequestError, Refused) as exc:
            self._reject(identity, exc.code, str(exc), msg.req_id)
            return
        rid = self.by_client[key] = uuid.uuid4().hex
        self.clients.setdefault(identity, self.now)
        if self._verifiers():
            self._admit(identity, msg, rid)
        else:
            self.held[rid] = Held(identity, msg, self.now)

    def _admit(self, client: bytes, msg: p.Generate, rid: str) -> None:
        """Check a request against the serving model. A text or chat prompt is then tokenized by the shell, on
        another thread, so that neither the event loop nor the receive loop waits for it."""
        try:
            info, lookahead, sampling = self._validate(msg)
        except RequestError as exc:
            self._unreserve((client, msg.req_id))
            self._reject(client, exc.code, str(exc), msg.req_id)
            return
        admitted = Admitted(client, msg, rid, info, lookahead, sampling)
        if msg.prompt_ids is not None:
            self._enqueue(admitted, msg.prompt_ids)
        else:
            self.tokenizing[rid] = admitted
            self._out.tokenize.append(Tokenize(rid, msg, self.vocab))

    def _admit_held(self) -> None:
        """A verify worker registered: the held requests are admitted, in the order they came."""
        for rid, held in list(self.held.items()):
            del self.held[rid]
            self._admit(held.client, held.msg, rid)

    def _enqueue(self, admitted: Admitted, ids: list[int]) -> None:
        """Queue an admitted request once its prompt ids are known, or refuse it."""
        msg = admitted.msg
        try:
            validate.prompt_ids(ids, msg, admitted.info)
        except validate.Invalid as exc:
            self._refuse(admitted, RequestError(Code.INVALID_REQUEST, str(exc)))
            return
        stop = set(msg.stop_token_ids) | (set() if msg.ignore_eos else set(admitted.info.eos_token_ids))
        self.requests[admitted.rid] = Request(
            rid=admitted.rid, client=admitted.client, client_req_id=msg.req_id, lookahead=admitted.lookahead,
            policy=msg.policy, sampling=admitted.sampling, text=TextStream(self.vocab.tokenizer, msg.stop),
            reach=admitted.lookahead,
            seq=Sequence(prompt_ids=ids, max_new_tokens=msg.max_new_tokens, stop_token_ids=frozenset(stop),
                         created=self.now))
        self.admission.enqueue(admitted.client, admitted.rid)
        self._schedule()

    def _refuse(self, admitted: Admitted, exc: RequestError) -> None:
        self._unreserve(admitted.key)
        self._reject(admitted.client, exc.code, str(exc), admitted.msg.req_id)

    def _validate(self, msg: p.Generate) -> tuple[p.Register, int, Sampling]:
        """What can be checked before the prompt is tokenized: the serving model's registration, the request's
        lookahead and its sampling."""
        info = self._verifiers()[0].info
        seed = msg.seed if msg.seed is not None else secrets.randbits(63)
        try:
            sampling = validate.request(msg, seed)
            validate.serving(msg, info, self.cfg.verify_model, self.vocab.tokenizer is not None,
                             self.vocab.chat is not None)
        except validate.Invalid as exc:
            raise RequestError(Code.INVALID_REQUEST, str(exc)) from None
        return info, self.cfg.lookahead if msg.lookahead is None else msg.lookahead, sampling

    def on_cancel(self, identity: bytes, msg: p.Cancel) -> None:
        if (identity, msg.req_id) in self.by_client:
            self._cancel((identity, msg.req_id), "cancelled")

    def _client_lost(self, client: bytes) -> None:
        """A client silent for the liveness window: its requests are cancelled so their workers serve others. Each
        is also failed to the client, with what it committed: a client that was only stalled (its event loop
        blocked) learns of it, where it would otherwise wait for the requests forever."""
        keys = [key for key in self.by_client if key[0] == client]
        log.warning("client %s went silent with %d requests in flight: cancelling them", client.hex(), len(keys))
        self.clients_lost += 1
        for key in keys:
            self.cancelled += 1
            self._fail(key, Code.CLIENT_LOST, f"cancelled: this client sent nothing for "
                                           f"{self.cfg.heartbeat_expiry_s:g}s while the request ran")
        self.clients.pop(client, None)

    def _cancel(self, key: tuple[bytes, str], reason: str) -> None:
        self.cancelled += 1
        req = self._end(key, reason)
        if req is not None:
            self._forget(req)

    def _end(self, key: tuple[bytes, str], reason: str) -> Request | None:
        """End a request wherever it is. One held or still being tokenized is gone at once (None); a queued or
        running one is returned, ended, for the caller to forget once it has told whom it must."""
        rid = self.by_client[key]
        if rid not in self.requests:  # held, or being tokenized
            self.held.pop(rid, None)
            if self.tokenizing.pop(rid, None) is not None:
                self._out.untokenize.append(rid)
            self._unreserve(key)
            return None
        req = self.requests[rid]
        req.seq.cancel(reason, self.now)
        return req

    # workers

    def on_register(self, identity: bytes, msg: p.Register) -> None:
        if msg.role not in (DRAFT, VERIFY):
            self._reject(identity, Code.INVALID_REGISTER, f"unknown role {msg.role!r}")
            return
        if msg.vocab_hash != self.vocab.hash:
            self._reject(identity, Code.VOCAB_MISMATCH,
                         f"{msg.role} model {msg.model} has a different vocabulary from {self.cfg.verify_model}, "
                         f"which this coordinator serves")
            return
        old = self.workers.get(identity)
        if old is not None:
            self._drop_worker(old, "re-registered")
        self.workers[identity] = WorkerRecord(identity, msg, self.now)
        log.info("registered %s worker %s (%s)", msg.role, identity.hex(), msg.model)
        self._send(p.Registered(seq=self.pub_seq, heartbeat_s=self.cfg.heartbeat_s, liveness=self.cfg.liveness),
                   identity)
        if msg.role == VERIFY:
            self._admit_held()
        self._schedule()

    def _worker(self, identity: bytes, role: str | None = None) -> WorkerRecord | None:
        """The registered worker behind identity; an unknown one is told to register again."""
        w = self.workers.get(identity)
        if w is None or (role is not None and w.info.role != role):
            kind = Code.UNKNOWN_WORKER if w is None else Code.WRONG_ROLE
            self._reject(identity, kind, "register first" if w is None else f"only a {role} worker may send this")
            return None
        w.last_seen = self.now
        return w

    def on_heartbeat(self, identity: bytes, msg: p.Heartbeat) -> None:
        w = self._worker(identity)
        if w is None:
            return
        was, w.beat = w.beat.healthy, msg
        if was and not msg.healthy:
            log.error("%s worker %s reports itself unhealthy (its passes fail whatever they hold): it gets no work, "
                      "and its requests are handed on", w.info.role, identity.hex())
            self._hand_on(w)
        elif msg.healthy and not was:
            log.info("%s worker %s is healthy again", w.info.role, identity.hex())
            if w.info.role == VERIFY:
                self._admit_held()
            self._schedule()

    def on_failed(self, identity: bytes, msg: p.Failed) -> None:
        """A worker's passes fail with this request in them: a verifier's failure ends it, a draft's detaches it."""
        w = self._worker(identity)
        req = self.requests.get(msg.req_id) if w is not None else None
        if req is None or identity not in (req.verifier, req.draft):
            return  # ended meanwhile
        if identity == req.verifier:
            self._fail(req.key, Code.INTERNAL, msg.message)
            return
        log.warning("request %s goes on without a draft: %s", req.rid, msg.message)
        w.requests.discard(req.rid)
        req.draft, req.draftless = None, True

    def on_snapshot(self, identity: bytes, msg: p.SnapshotRequest) -> None:
        if self._worker(identity) is None:
            return
        req = self.requests.get(msg.req_id)
        self._send(p.Snapshot(
      req_id=msg.req_id, seq=self.pub_seq, epoch=req.seq.epoch if req else 0,
      committed=req.seq.committed if req else [], done=req is None or req.seq.done), identity)

    def _own_request(self, identity: bytes, role: str, req_id: str) -> Request | None:
        """The request a worker speaks for, if it is still assigned to it; late messages are dropped quietly."""
        if self._worker(identity, role) is None:
            return None
        req = self.requests.get(req_id)
        if req is None or identity not in (req.verifier, req.draft):
            self.rejects.add(Code.STALE, f"{role} message for a request it no longer serves")
            self._send(p.Release(req_id=req_id), identity)  # in case its Release was lost
            return None
        return req

    def on_propose(self, identity: bytes, msg: p.Propose) -> None:
        req = self._own_request(identity, DRAFT, msg.req_id)
        if req is None:
            return
        problem = proposal_problem(req.sampling.mode, msg.token_ids, msg.q_ids, msg.q_probs,
                                   self.workers[identity].info.vocab_size)
        if problem:
            self._reject(identity, Code.INVALID_PROPOSAL, f"proposal refused: {problem}", msg.req_id)
            return
        start, fresh, rollback = req.seq.propose(msg.epoch, msg.pos, msg.token_ids, self.now)
        if fresh and req.verifier is not None:
            at = slice(start - msg.pos, start - msg.pos + len(fresh))
            self._send(p.Propose(req_id=req.rid, epoch=req.seq.epoch, pos=start, token_ids=fresh,
                                 q_ids=msg.q_ids[at], q_probs=msg.q_probs[at]), req.verifier)
        if rollback:
            self._commit(req, len(req.seq.committed), [])

    def on_verdict(self, identity: bytes, msg: p.Verdict) -> None:
        req = self._own_request(identity, VERIFY, msg.req_id)
        if req is None:
            return
        if any(t >= self.workers[identity].info.vocab_size for t in msg.token_ids) or msg.accepted > msg.proposed:
            self._reject(identity, Code.INVALID_VERDICT, "verdict with out-of-range values", msg.req_id)
            return
        applied = req.seq.verdict(msg.start, msg.token_ids, msg.proposed, msg.accepted, self.now, msg.step_ms / 1000,
                                  msg.rows)
        if applied is None:
            if msg.start > len(req.seq.committed) and msg.epoch >= req.resent_epoch:
                self._resend(req, f"a verdict before position {msg.start} was lost")
            else:
                self.rejects.add(Code.STALE, f"verdict at {msg.start}, committed length {len(req.seq.committed)}")
            return
        req.progress, req.stalled_at = self.now, None
        req.reach = min(msg.lookahead, req.lookahead)
        self.workers[identity].reach = msg.lookahead
        tokens, _ = applied
        text, keep = req.text.push(tokens)
        if keep is not None:
            tokens = tokens[:keep]
            req.seq.stop_at(msg.start + keep, self.now)
        elif req.seq.done:
            text += req.text.flush()
        self._commit(req, msg.start, tokens)
        self._send(p.Tokens(req_id=req.client_req_id, start=msg.start, token_ids=tokens, text=text), req.client)
        if req.seq.done:
            self._finish(req)

    def _commit(self, req: Request, start: int, tokens: list[int]) -> None:
        if req.reach == req.published_reach == 0 and not req.seq.done:
            return  # its verifier has switched speculation off: the draft, idle, catches up from a snapshot later
        req.published_reach = req.reach
        self.pub_seq += 1
        self._publish(p.Commit(seq=self.pub_seq, req_id=req.rid, epoch=req.seq.epoch, start=start,
                               token_ids=tokens, done=req.seq.done, lookahead=req.reach))

    # assignment

    @staticmethod
    def _least_loaded(workers: list[WorkerRecord]) -> WorkerRecord | None:
        """The worker with the most room, if any has room: requests spread over workers before they batch."""
        free = [w for w in workers if len(w.requests) < w.info.max_batch]
        return min(free, key=lambda w: len(w.requests) / w.info.max_batch, default=None)

    def _schedule(self) -> None:
        while (verifier := self._least_loaded(self._verifiers())) is not None:
            rid = self.admission.next()
            if rid is None:
                break
            req = self.requests[rid]
            req.verifier = verifier.identity
            verifier.requests.add(req.rid)
            if verifier.reach is not None:  # a draft joining runs as far ahead as the verifier now wants
                req.reach = min(req.lookahead, verifier.reach)
            req.progress, req.stalled_at = self.now, None
            self._assign(req, req.verifier)
            if req.orphaned is None:
                req.seq.started = self.now
            else:  # resuming: the draft must send its standing guesses again, to the new verifier
                req.orphaned = None
                req.seq.resync()
                self._commit(req, len(req.seq.committed), [])
        for req in self.requests.values():  # a draft with room joins any request running without one
            if req.verifier is not None and req.draft is None and not req.draftless:
                draft = self._least_loaded(self._drafts())
                if draft is None:
                    break
                req.draft = draft.identity
                draft.requests.add(req.rid)
                self._assign(req, draft.identity)

    def _assign(self, req: Request, identity: bytes) -> None:
        s = req.seq
        self._send(p.Assign(
      req_id=req.rid, prompt_ids=s.prompt_ids, committed=s.committed, epoch=s.epoch,
      max_new_tokens=s.max_new_tokens, stop_token_ids=sorted(s.stop_token_ids),
      lookahead=req.lookahead if identity == req.verifier else req.reach,
      policy=req.policy, sampling_mode=req.sampling.mode, temperature=req.sampling.temperature,
      top_k=req.sampling.top_k, top_p=req.sampling.top_p, seed=req.sampling.seed),
      identity)

    def _release(self, req: Request) -> None:
        for identity in (req.verifier, req.draft):
            w = self.workers.get(identity) if identity else None
            if w is not None and req.rid in w.requests:
                w.requests.discard(req.rid)
                self._send(p.Release(req_id=req.rid), identity)
        req.verifier = req.draft = None

    def _finish(self, req: Request) -> None:
        """Called on the verdict that ends the request, so its verifier is the one that computed it."""
        verifier = self.workers[req.verifier].info
        stats = {**req.seq.summary(self.now), "seed": req.sampling.seed, "runner": verifier.runner, "kernels": verifier.kernels}
        self._send(p.Done(req_id=req.client_req_id, finish_reason=req.seq.finish_reason,
                          prompt_ids=req.seq.prompt_ids, stats=stats), req.client)
        self.served += 1
        self._forget(req)

    def _fail(self, key: tuple[bytes, str], code: str, message: str) -> None:
        """End a request with an error carrying what it committed; one still being tokenized has none."""
        if key not in self.by_client:
            return
        req = self._end(key, code)
        self.failed[code] += 1
        self._send(p.Error(code=code, message=message, req_id=key[1],
                           token_ids=req.seq.committed if req else []), key[0])
        if req is not None:
            self._forget(req)

    def _unreserve(self, key: tuple[bytes, str]) -> None:
        """Forget an admitted request that never reached the queue."""
        self.admission.release(key[0], self.by_client.pop(key))
        if key[0] not in self.admission.in_flight:
            self.clients.pop(key[0], None)

    def _forget(self, req: Request) -> None:
        if self.requests.pop(req.rid, None) is None:
            return
        self._unreserve(req.key)
        self._release(req)
        self._schedule()

    def _drop_worker(self, w: WorkerRecord, why: str) -> None:
        log.warning("dropping %s worker %s: %s", w.info.role, w.identity.hex(), why)
        self.workers.pop(w.identity, None)
        self._hand_on(w)

    def _hand_on(self, w: WorkerRecord) -> None:
        """A worker's requests, to others: a verifier's resume on the next with room, from their committed
        tokens; a draft's carry on without one until a draft with room joins."""
        for req in [self.requests[rid] for rid in w.requests if rid in self.requests]:
            if w.info.role == DRAFT:
                req.draft = None
            else:
                req.verifier, req.orphaned = None, self.now
                self.admission.resume(req.rid)
        w.requests.clear()
        self._schedule()
