"""Optional CURVE encryption and authentication: key files, securing sockets, and the coordinator's allow-list.

With CURVE on, every connection to the coordinator is encrypted, and its ZAP handler admits only the public keys
in its allow-list directory. Any other peer fails the handshake, so none of its frames ever reaches the code.
"""
from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.asyncio
import zmq.auth
from zmq.auth.asyncio import AsyncioAuthenticator
from zmq.utils.monitor import parse_monitor_message

from ..config import BY_NAME, COORDINATOR
from .codes import Code
from .transport import Rejects

log = logging.getLogger(__name__)
SECRET, SERVER, ALLOW = (BY_NAME[n] for n in ("curve_secret_key", "curve_server_key", "curve_allow_dir"))
REFUSED = zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL


@dataclass(frozen=True)
class Keys:
    public: bytes
    secret: bytes
    server: bytes | None  # the coordinator's public key; None on the coordinator itself
    allow_dir: str = ""  # the coordinator's: the public keys it admits


def load_keys(role: str, secret_key: str, peer: str) -> Keys | None:
    """A role's CURVE keys, or None when CURVE is off (both paths empty). `peer` is the allow-list directory for the
    coordinator and the coordinator's public key file for everyone else. Half a configuration, or a key that can't
    be read, is an error at startup: never a silent fallback to plaintext."""
    other = ALLOW if role == COORDINATOR else SERVER
    if not secret_key and not peer:
        return None
    if not (secret_key and peer):
        have, lack = (SECRET, other) if secret_key else (other, SECRET)
        raise ValueError(f"{have.env} is set but {lack.env} is not: CURVE on the {role} needs both, or neither")
    public, secret = _read(SECRET, secret_key)
    if secret is None:
        raise ValueError(f"{SECRET.env}={secret_key} holds no secret key (give the NAME.key_secret file)")
    if role != COORDINATOR:
        return Keys(public, secret, _read(SERVER, peer)[0])
    allow_dir = os.path.expanduser(peer)
    try:
        allowed = zmq.auth.load_certificates(allow_dir)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{ALLOW.env}: {exc}") from None
    if not allowed:
        raise ValueError(f"{ALLOW.env}={peer} holds no NAME.key public keys, so no worker or client could connect")
    return Keys(public, secret, None, allow_dir)


def _read(setting, path: str) -> tuple[bytes, bytes | None]:
    try:
        return zmq.auth.load_certificate(os.path.expanduser(path))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{setting.env}: {exc}") from None


def secure(sock: zmq.Socket, keys: Keys | None) -> None:
    """CURVE on a socket before it binds or connects: the server side on the coordinator's, the client side on the
    rest. Nothing when CURVE is off."""
    if keys is None:
        return
    sock.curve_publickey, sock.curve_secretkey = keys.public, keys.secret
    if keys.server is None:
        sock.curve_server = True
    else:
        sock.curve_serverkey = keys.server


class Gate:
    """The coordinator's ZAP handler. Start it before binding: until a handler is bound, libzmq admits any key."""

    def __init__(self, ctx: zmq.asyncio.Context, keys: Keys, rejects: Rejects):
        self.rejects = rejects
        self.auth = AsyncioAuthenticator(ctx)
        self.auth.start()
        self.auth.configure_curve(location=keys.allow_dir)
        log.info("CURVE on: admitting the %d public keys in %s", len(self.auth.certs["*"]), keys.allow_dir)

    async def count_refusals(self, sock: zmq.asyncio.Socket) -> None:
        """Count the handshakes `sock` refuses, as `not_allowed` (a key off the allow-list) or `handshake_failed`
        (typically a peer with no CURVE key), until cancelled."""
        monitor = sock.get_monitor_socket(REFUSED)
        try:
            while True:
                event = parse_monitor_message(await monitor.recv_multipart())
                if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                    self.rejects.add(Code.NOT_ALLOWED, "a peer's CURVE key is not in the allow-list")
                else:
                    self.rejects.add(Code.HANDSHAKE_FAILED, f"a peer failed the CURVE handshake (error "
                                                         f"{event['value']:#x}): most likely it has no CURVE key")
        finally:
            sock.disable_monitor()
            monitor.close()

    def stop(self) -> None:
        self.auth.stop()


def keygen(directory: str | Path, names: list[str]) -> dict[str, dict[str, str]]:
    """Write a key pair per name (NAME.key public, NAME.key_secret secret) and allow every name but `coordinator` in
    DIRECTORY/allowed. Returns each name's settings. Existing keys are never overwritten: others may depend on them."""
    directory = Path(directory).resolve()
    allowed = directory / "allowed"
    allowed.mkdir(parents=True, exist_ok=True)
    taken = [n for n in names if (directory / f"{n}.key_secret").exists()]
    if taken:
        raise ValueError(f"keys already exist in {directory} for {', '.join(taken)}")
    settings = {}
    for name in names:
        public, secret = zmq.auth.create_certificates(directory, name)
        os.chmod(secret, 0o600)
        if name == COORDINATOR:
            settings[name] = {SECRET.env: secret, ALLOW.env: str(allowed)}
        else:
            shutil.copy(public, allowed)
            settings[name] = {SECRET.env: secret, SERVER.env: str(directory / f"{COORDINATOR}.key")}
    return settings
