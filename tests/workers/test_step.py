"""Workers against a scripted coordinator: what they do with garbage, gaps and snapshots."""
import asyncio
import tempfile

import msgpack
import pytest
import pytest_asyncio
import zmq
import zmq.asyncio

from amusd_mq import config
from amusd_mq.config import pub_url
from amusd_mq.runtime.load import load
from amusd_mq.runtime.thread import ModelThread
from amusd_mq.wire import protocol as p
from amusd_mq.workers.draft import DraftWorker
from amusd_mq.workers.verify import VerifyWorker

pytestmark = pytest.mark.asyncio


class ScriptedCoordinator:
    def __init__(self):
        self.url = f"ipc://{tempfile.mkdtemp(prefix='amw-')}/c"
        self.ctx = zmq.asyncio.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.bind(self.url)
        self.pub = self.ctx.socket(zmq.PUB)
        self.pub.bind(pub_url(self.url))

    async def expect(self, kind, timeout=10.0):
        while True:
            identity, frame = await asyncio.wait_for(self.router.recv_multipart(), timeout)
            msg = p.decode(frame, 1 << 26)
            if isinstance(msg, kind):
                return identity, msg

    async def send(self, identity, msg):
        await self.router.send_multipart([identity, msg if isinstance(msg, bytes) else p.encode(msg)])

    async def publish(self, msg):
        await self.pub.send(p.encode(msg))

    def close(self):
        self.router.close(0)
        self.pub.close(0)
        self.ctx.term()


@pytest_asyncio.fixture
async def harness(tiny_cache):
    coordinator = ScriptedCoordinator()
    cfg = config.load(env={"AMUSD_COORDINATOR_URL": coordinator.url, "AMUSD_HEARTBEAT_S": "0.5"})
    stop = asyncio.Event()
    tasks = []

    def start(worker_cls, model):
        worker = worker_cls(cfg, load(model, "cpu", "float32", tiny_cache), ModelThread(1))
        tasks.append(asyncio.create_task(worker.run(stop)))
        return worker

    yield coordinator, start
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    coordinator.close()


def assign(**kw):
    base = dict(req_id="r1", prompt_ids=[5, 6, 7], committed=[], epoch=0, max_new_tokens=8, stop_token_ids=[],
                lookahead=4, policy="eager")
    return p.Assign(**{**base, **kw})


async def test_verify_worker_rejects_garbage_and_keeps_serving(harness, reference):
    coordinator, start = harness
    worker = start(VerifyWorker, "tiny-verify")
    identity, reg = await coordinator.expect(p.Register, timeout=30)
    assert reg.role == "verify"
    await coordinator.send(identity, p.Registered(seq=0, heartbeat_s=0.5, liveness=5))
    version = p.PROTOCOL_VERSION
    for junk in (b"\xc1junk", msgpack.packb({"v": 7, "t": "assign"}), msgpack.packb({"v": version, "t": "nope"}),
                 msgpack.packb({"v": version, "t": [1]}), msgpack.packb({"v": version, "t": "release", b"x": 1}),
                 msgpack.packb({"v": True, "t": "release", "req_id": "r1"}),
                 p.encode(p.Welcome(req_id="h", instance="i", model="m", verifiers=0, drafts=0, vocab_size=1,
                                    max_context=1, eos_token_ids=[], heartbeat_s=1.0, max_message_bytes=1024)),
                 p.encode(assign(req_id="bad", prompt_ids=[10**6]))):
        await coordinator.send(identity, junk)
    await coordinator.send(identity, assign())
    tokens = []
    while len(tokens) < 8:
        _, verdict = await coordinator.expect(p.Verdict)
        assert verdict.req_id == "r1" and verdict.start == len(tokens)
        tokens += verdict.token_ids
    assert tokens == reference([5, 6, 7], 8)
    assert {"malformed", "version", "unknown_type", "unexpected_type", "invalid_assign"} <= set(worker.rejects.counts)


async def test_verify_worker_joins_mid_request_from_a_snapshot(harness, reference):
    coordinator, start = harness
    start(VerifyWorker, "tiny-verify")
    identity, _ = await coordinator.expect(p.Register, timeout=30)
    await coordinator.send(identity, p.Registered(seq=0, heartbeat_s=0.5, liveness=5))
    ref = reference([5, 6, 7], 8)
    await coordinator.send(identity, assign(committed=ref[:5], epoch=3))
    _, verdict = await coordinator.expect(p.Verdict)
    assert verdict.start == 5 and verdict.token_ids == ref[5:6]


async def test_draft_resyncs_from_a_snapshot_after_a_gap(harness, reference):
    coordinator, start = harness
    start(DraftWorker, "tiny-draft")
    identity, reg = await coordinator.expect(p.Register, timeout=30)
    assert reg.role == "draft"
    await coordinator.send(identity, p.Registered(seq=0, heartbeat_s=0.5, liveness=5))
    await coordinator.send(identity, assign(max_new_tokens=40))
    _, first = await coordinator.expect(p.Propose)
    assert (first.epoch, first.pos) == (0, 0)

    async def beat_until_snapshot_request():  # a beat ahead of the last commit seen means updates were lost
        while True:
            await coordinator.publish(p.Beat(seq=7))
            try:
                return await coordinator.expect(p.SnapshotRequest, timeout=0.1)
            except asyncio.TimeoutError:
                pass

    _, req = await asyncio.wait_for(beat_until_snapshot_request(), 10)
    assert req.req_id == "r1"
    committed = [1, 2, 3, 4, 5, 6]  # the canonical state disagrees with everything drafted so far
    await coordinator.send(identity, p.Snapshot(req_id="r1", seq=7, epoch=2, committed=committed, done=False))
    while True:
        _, prop = await coordinator.expect(p.Propose)
        if prop.epoch == 2:
            break
    assert prop.pos == len(committed)
    # a later commit with a gap in sequence numbers triggers another snapshot request
    await coordinator.publish(p.Commit(seq=9, req_id="r1", epoch=2, start=6, token_ids=[9], done=False, lookahead=4))
    _, again = await coordinator.expect(p.SnapshotRequest)
    assert again.req_id == "r1"


async def test_draft_rolls_back_on_a_contradicting_commit(harness):
    coordinator, start = harness
    start(DraftWorker, "tiny-draft")
    identity, _ = await coordinator.expect(p.Register, timeout=30)
    await coordinator.send(identity, p.Registered(seq=0, heartbeat_s=0.5, liveness=5))
    await coordinator.send(identity, assign(max_new_tokens=40, lookahead=3))
    guesses = []
    while len(guesses) < 3:  # it stops at the lookahead cap
        _, prop = await coordinator.expect(p.Propose)
        guesses += prop.token_ids
    wrong = (guesses[0] + 1) % 258
    seq = 0
    while True:  # publish until the subscriber has joined (the slow-joiner problem)
        seq += 1
        await coordinator.publish(p.Commit(seq=seq, req_id="r1", epoch=1, start=0, token_ids=[wrong], done=False,
                                           lookahead=4))
        try:
            _, prop = await coordinator.expect(p.Propose, timeout=0.2)
            break
        except asyncio.TimeoutError:
            pass
    assert prop.epoch == 1 and prop.pos == 1  # rebuilt on the committed token, under the new epoch


async def test_an_assign_in_the_same_frame_as_registered_is_served(harness, reference):
    """The coordinator sends what one frame caused as one frame: a worker registering while a request waits gets
    `registered` and the `assign` together, and must not drop the second."""
    coordinator, start = harness
    start(VerifyWorker, "tiny-verify")
    identity, _ = await coordinator.expect(p.Register, timeout=30)
    await coordinator.send(identity, p.encode(p.Batch([p.Registered(seq=0, heartbeat_s=0.5, liveness=5), assign()])))
    _, verdict = await coordinator.expect(p.Verdict)
    assert verdict.req_id == "r1" and verdict.token_ids == reference([5, 6, 7], 8)[:1]


async def test_a_worker_keeps_the_heartbeat_the_coordinator_sets(harness):
    """Configured for beats every 0.5 s and 5 missed, a worker told 0.1 s and 2 by `registered` beats every 0.1 s
    and, the coordinator then silent, presumes it dead after 0.2 s and registers again."""
    coordinator, start = harness
    start(VerifyWorker, "tiny-verify")
    identity, _ = await coordinator.expect(p.Register, timeout=30)
    loop = asyncio.get_running_loop()
    registered = loop.time()
    await coordinator.send(identity, p.Registered(seq=0, heartbeat_s=0.1, liveness=2))
    await coordinator.expect(p.Heartbeat, timeout=0.4)
    await coordinator.expect(p.Register, timeout=1.5)
    assert loop.time() - registered < 1.5  # its own settings would have waited 2.5 s
