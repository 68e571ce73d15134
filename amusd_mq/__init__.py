"""amusd-mq: asynchronous multi-device speculative decoding over ZeroMQ."""
from .client import (
                     AmusdError,
                     AsyncClient,
                     Chunk,
                     CoordinatorUnavailableError,
                     GenerationResult,
                     InvalidRequestError,
                     NoWorkerError,
                     RequestFailedError,
                     RequestTimeoutError,
)
from .protocol import PROTOCOL_VERSION

__all__ = ["AsyncClient", "Chunk", "GenerationResult", "AmusdError", "CoordinatorUnavailableError", "NoWorkerError",
           "InvalidRequestError", "RequestFailedError", "RequestTimeoutError", "PROTOCOL_VERSION"]
