"""The one place sockets are made, framed and read. Everything received is validated here."""
from __future__ import annotations

import logging
import socket
import time
from collections import Counter
from urllib.parse import urlsplit

import zmq
import zmq.asyncio

from ..config import ConfigurationError
from .codes import Code
from .protocol import Batch, Message, ProtocolError, decode, encode, encode_all

log = logging.getLogger(__name__)


def ensure_free(url: str) -> None:
    """Refuse to bind where another process listens. tcp refuses by itself; an ipc bind would silently take
    the path over, leaving two coordinators, each with part of the clients and workers."""
    parts = urlsplit(url)
    if parts.scheme != "ipc":
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(parts.netloc + parts.path)
    except OSError:
        return  # nothing there, or a stale file from a dead process: binding replaces it
    finally:
        probe.close()
    raise OSError(f"another process is already listening at {url}")


def http_listener(host: str, port: int) -> socket.socket:
    """The gateway's HTTP socket, bound and listening: made before the HTTP stack loads, so that a request sent
    while the gateway starts waits in the kernel's backlog instead of being refused."""
    try:
        return socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET,
                                    backlog=2048)
    except OSError as exc:
        raise ConfigurationError(f"cannot listen on http://{host}:{port}: {exc}") from None


def make_socket(ctx: zmq.asyncio.Context, kind: int, max_bytes: int) -> zmq.asyncio.Socket:
    sock = ctx.socket(kind)
    sock.linger = 0
    # A hard cap well above the validated limit: frames between the two are read and refused with a
    # reply; libzmq silently drops the connection of anything larger, so memory stays bounded.
    sock.setsockopt(zmq.MAXMSGSIZE, 4 * max_bytes)
    if kind in (zmq.ROUTER, zmq.PUB):
        sock.sndhwm = 100_000
    return sock


class Rejects:
    """Counts refused frames by kind and logs each kind at most once per interval."""

    def __init__(self, interval_s: float = 10.0):
        self.counts: Counter[str] = Counter()
        self._interval = interval_s
        self._logged: dict[str, float] = {}

    def add(self, kind: str, detail: str) -> None:
        self.counts[kind] += 1
        now = time.monotonic()
        if now - self._logged.get(kind, -self._interval) >= self._interval:
            self._logged[kind] = now
            log.warning("rejected %s message (%d so far): %s", kind, self.counts[kind], detail)


async def send(sock: zmq.asyncio.Socket, msg: Message, identity: bytes | None = None, limit: int | None = None) -> None:
    """Send one message; with a limit, a frame larger than the receiver accepts is refused here (ProtocolError
    `oversized`) instead of being sent to be refused there."""
    frame = encode(msg)
    if limit is not None and len(frame) > limit:
        raise ProtocolError(Code.OVERSIZED, f"a frame of {len(frame)} bytes exceeds the receiver's limit of {limit}")
    await _send_frame(sock, frame, [msg], identity)


async def send_all(sock: zmq.asyncio.Socket, msgs: list[Message], limit: int, identity: bytes | None = None) -> None:
    """Messages for one receiver in as few frames as the receiver's limit allows (in one, nearly always): per
    message, the socket and the event loops on both ends cost more than its encoding."""
    if msgs:
        for inner, frame in encode_all(msgs, limit):
            await _send_frame(sock, frame, inner, identity)


async def _send_frame(sock: zmq.asyncio.Socket, frame: bytes, inner: list[Message], identity: bytes | None) -> None:
    await sock.send_multipart([identity, frame] if identity is not None else [frame])


async def recv(sock: zmq.asyncio.Socket, max_bytes: int, routed: bool) -> tuple[bytes | None, list[Message]]:
    """The validated messages of one frame (several for a batch), with the sender's identity on a ROUTER.
    Raises ProtocolError (carrying the identity when known, so the caller can reply)."""
    frames = await sock.recv_multipart(copy=True)
    identity = frames.pop(0) if routed and len(frames) > 1 else None
    try:
        if len(frames) != 1:
            raise ProtocolError(Code.MALFORMED, f"expected one payload frame, got {len(frames)}")
        msg = decode(frames[0], max_bytes)
    except ProtocolError as exc:
        exc.identity = identity
        raise
    return identity, msg.messages if isinstance(msg, Batch) else [msg]


async def recv_valid(sock: zmq.asyncio.Socket, max_bytes: int, rejects: Rejects) -> list[Message]:
    """The next valid messages on a socket with no peer to answer (DEALER, SUB); the rest are counted."""
    while True:
        try:
            return (await recv(sock, max_bytes, routed=False))[1]
        except ProtocolError as exc:
            rejects.add(exc.kind, str(exc))
