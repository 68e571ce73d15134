"""Message faults between services (AMUSD_FAULT_*): a ZeroMQ context whose sockets drop, duplicate or hold back (so
that later messages overtake) the frames of the links the protocol protects with epochs and sequence numbers.
A service's main makes its sockets in this context when the settings ask for faults; nothing else knows of it.
tests/faults/test_messages.py checks that the protocol absorbs all of it."""
from __future__ import annotations

import asyncio
import random
from collections import Counter
from dataclasses import dataclass, field

import zmq
import zmq.asyncio

from .protocol import Batch, decode

# Clients and registration are not faulted: nothing but a retry by hand would recover a lost request.
TYPES = frozenset({"propose", "verdict", "commit", "beat", "assign", "release", "snapshot", "snapshot_request",
                   "heartbeat"})
READ_BYTES = 1 << 40  # a frame is only read here to learn its messages' types: any size


@dataclass
class Faults:
    drop: float
    dup: float
    delay: float
    delay_ms: float
    seed: int
    counts: Counter = field(default_factory=Counter)

    def __post_init__(self):
        self._rng = random.Random(self.seed)

    @classmethod
    def of(cls, cfg) -> Faults | None:
        """The faults the settings ask for, or None."""
        if not (cfg.fault_drop or cfg.fault_dup or cfg.fault_delay):
            return None
        return cls(cfg.fault_drop, cfg.fault_dup, cfg.fault_delay, cfg.fault_delay_ms, cfg.fault_seed)

    def context(self) -> zmq.asyncio.Context:
        """A context whose sockets send through these faults."""
        faults = self

        class Socket(zmq.asyncio.Socket):
            def send_multipart(self, frames, *args, **kwargs):
                if not faults.applies(frames[-1]):
                    return super().send_multipart(frames, *args, **kwargs)
                return faults.send(self, frames)

        class Context(zmq.asyncio.Context):
            _socket_class = Socket

        return Context()

    @staticmethod
    def applies(frame: bytes) -> bool:
        try:
            msg = decode(frame, READ_BYTES)
        except ValueError:  # not one of ours (the CURVE handshake's ZAP replies)
            return False
        return all(m.TYPE in TYPES for m in (msg.messages if isinstance(msg, Batch) else [msg]))

    async def send(self, sock: zmq.asyncio.Socket, frames: list[bytes]) -> None:
        send = zmq.asyncio.Socket.send_multipart  # the socket's own send, without the faults
        roll = self._rng.random()
        if roll < self.drop:
            self.counts["dropped"] += 1
            return
        if roll < self.drop + self.delay:
            self.counts["delayed"] += 1
            asyncio.get_running_loop().call_later(self._rng.uniform(0, self.delay_ms) / 1000, self._late, sock, frames)
            return
        if roll < self.drop + self.delay + self.dup:
            self.counts["duplicated"] += 1
            await send(sock, frames)
        await send(sock, frames)

    @staticmethod
    def _late(sock: zmq.asyncio.Socket, frames: list[bytes]) -> None:
        if not sock.closed:
            zmq.asyncio.Socket.send_multipart(sock, frames, flags=zmq.NOBLOCK)
