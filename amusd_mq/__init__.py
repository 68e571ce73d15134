"""amusd-mq: asynchronous multi-device speculative decoding over ZeroMQ.

Laid out by role: `wire` (messages, codec, sockets), `coordinator`, `workers`, `runtime` (running models), `text`
(vocabularies, chat, detokenizing), `frontend` (the Python client and the OpenAI gateway), `cli` (the command and
process launching), `bench` (benchmark code only). The modules at this level are what several roles share:
`config` (every setting), `models` (where weights come from), `sampling`, `sequence` (the canonical-sequence
state machine) and `tasks` (service task groups). This package exports the client API.
"""
from .frontend.client import (
                     AmusdError,
                     AsyncClient,
                     Chunk,
                     ClientClosedError,
                     CoordinatorUnavailableError,
                     GenerationResult,
                     InvalidRequestError,
                     NoWorkerError,
                     OverloadedError,
                     RequestFailedError,
                     RequestTimeoutError,
                     RequestTooLargeError,
)
from .wire.protocol import PROTOCOL_VERSION

__all__ = ["AsyncClient", "Chunk", "GenerationResult", "AmusdError", "ClientClosedError", "CoordinatorUnavailableError",
           "NoWorkerError", "InvalidRequestError", "OverloadedError", "RequestFailedError", "RequestTimeoutError",
           "RequestTooLargeError", "PROTOCOL_VERSION"]
