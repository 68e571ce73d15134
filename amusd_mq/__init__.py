"""amusd-mq: asynchronous multi-device speculative decoding over ZeroMQ."""
from .client import (
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
from .protocol import PROTOCOL_VERSION

__all__ = ["AsyncClient", "Chunk", "GenerationResult", "AmusdError", "ClientClosedError", "CoordinatorUnavailableError",
           "NoWorkerError", "InvalidRequestError", "OverloadedError", "RequestFailedError", "RequestTimeoutError",
           "RequestTooLargeError", "PROTOCOL_VERSION"]
