"""The message-fault context: its sockets fault only the links the protocol protects, and only as told. That the
protocol absorbs the faults is tested through whole deployments (tests/faults/test_messages.py)."""
import asyncio

import pytest
import zmq

from amusd_mq import config
from amusd_mq.wire import protocol as p
from amusd_mq.wire.faults import Faults
from amusd_mq.wire.transport import make_socket, send, send_all

VERDICT = p.Verdict(req_id="r", start=0, token_ids=[1], proposed=0, accepted=0, epoch=0, lookahead=1)
GENERATE = p.Generate(req_id="c", max_new_tokens=1, prompt_ids=[1])


async def received(faults: Faults, *sends) -> list[p.Message]:
    """What a PAIR socket of the faulty context sends arrives as, within 0.3 s, at a plain one."""
    ctx = faults.context()
    out, into = make_socket(ctx, zmq.PAIR, 1 << 20), make_socket(ctx, zmq.PAIR, 1 << 20)
    into.bind("inproc://faults")
    out.connect("inproc://faults")
    try:
        for message in sends:
            await message(out)
        got = []
        while await into.poll(300):
            got += [p.decode(await into.recv(), 1 << 20)]
        return got
    finally:
        out.close()
        into.close()
        ctx.term()


@pytest.mark.asyncio
async def test_a_dropped_link_loses_its_messages_but_never_a_clients():
    faults = Faults(drop=1.0, dup=0.0, delay=0.0, delay_ms=0.0, seed=1)
    got = await received(faults, lambda s: send(s, VERDICT), lambda s: send(s, GENERATE))
    assert got == [GENERATE] and faults.counts == {"dropped": 1}


@pytest.mark.asyncio
async def test_duplicated_and_delayed_messages_arrive_twice_and_late():
    dup = Faults(drop=0.0, dup=1.0, delay=0.0, delay_ms=0.0, seed=1)
    assert await received(dup, lambda s: send_all(s, [VERDICT, VERDICT], 1 << 20)) == [p.Batch([VERDICT] * 2)] * 2
    late = Faults(drop=0.0, dup=0.0, delay=1.0, delay_ms=50.0, seed=1)

    async def then_generate(s):
        await send(s, VERDICT)
        await send(s, GENERATE)
        await asyncio.sleep(0.06)

    assert await received(late, then_generate) == [GENERATE, VERDICT]  # overtaken
    assert dup.counts == {"duplicated": 1} and late.counts == {"delayed": 1}


def test_no_fault_setting_means_no_faulty_context():
    assert Faults.of(config.load(env={})) is None
    assert Faults.of(config.load(env={"AMUSD_FAULT_DROP": "0.1"})).drop == 0.1
