"""The OpenAI wire format, as vLLM serves it: request bodies checked into the Python client's arguments, and the
response, stream chunk and error bodies built from what the client returns. No I/O; gateway.py serves it."""
from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from . import client
from .client import AmusdError, GenerationResult

COMPLETION_MAX_TOKENS = 16  # OpenAI's default for completions
# OpenAI lets a chat run to the end of the context by default; here one forgotten max_tokens would hold a
# verifier's slot for thousands of tokens, so the default is bounded.
CHAT_MAX_TOKENS = 512
SPECULATION_STATS = ("proposed", "accepted", "rollbacks", "acceptance_rate")


class APIError(Exception):
    """An error as OpenAI's clients expect it: an HTTP status and {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, kind: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.kind, self.code, self.param = status, kind, code, param

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


# What each client error is over HTTP: (status, OpenAI error type).
# The first that matches: a subclass before its base.
STATUS = ((client.RequestTooLargeError, 413, "invalid_request_error"),
          (client.InvalidRequestError, 400, "invalid_request_error"), (client.OverloadedError, 429, "rate_limit_error"),
          (client.NoWorkerError, 503, "service_unavailable"),
          (client.CoordinatorUnavailableError, 503, "service_unavailable"),
          (client.ClientClosedError, 503, "service_unavailable"), (client.RequestTimeoutError, 504, "timeout"))


def api_error(exc: AmusdError) -> APIError:
    for kind, status, name in STATUS:
        if isinstance(exc, kind):
            return APIError(status, str(exc), name, getattr(exc, "code", None))
    return APIError(500, str(exc), "server_error", getattr(exc, "code", None))


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingBody(BaseModel):
    """What completions and chat share. Unknown fields are ignored, as OpenAI's own server does. Only types are
    checked here: every bound is the request validator's, which the client runs, so a value out of bounds is
    refused with the same message through the gateway as through the Python client."""
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # an extension, as in vLLM: 0 or -1 for no limit
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    ignore_eos: bool = False  # an extension, as in vLLM
    deadline_s: float | None = None  # an extension: past it the request fails with a 504

    @field_validator("n")
    @classmethod
    def _one(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n=1 is supported: each choice would be another request, so send several")
        return n

    @field_validator("echo", "logprobs", check_fields=False)  # the subclasses' fields, each of its own type
    @classmethod
    def _unsupported(cls, value):
        if value:
            raise ValueError("not supported")
        return value

    def arguments(self, default_max_tokens: int) -> dict:
        """AsyncClient.stream's arguments, the prompt aside."""
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return {"max_new_tokens": default_max_tokens if self.max_tokens is None else self.max_tokens,
                "temperature": self.temperature, "top_p": self.top_p, "top_k": 0 if self.top_k == -1 else self.top_k,
                "seed": self.seed, "stop": stop,
                "ignore_eos": self.ignore_eos, "deadline_s": self.deadline_s}

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(SamplingBody):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None

    def prompts(self) -> list[dict]:
        """One prompt argument per choice: a list of strings or of token-id lists is several prompts."""
        prompt = self.prompt
        if not prompt:
            raise APIError(400, "prompt is empty", "invalid_request_error", param="prompt")
        if isinstance(prompt, str):
            return [{"prompt": prompt}]
        if isinstance(prompt[0], int):
            return [{"prompt_ids": prompt}]
        return [{"prompt": p} if isinstance(p, str) else {"prompt_ids": p} for p in prompt]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | list[dict] | None = None

    def plain(self, index: int) -> dict[str, str]:
        """As the template sees it: text parts joined; anything but text is refused."""
        if isinstance(self.content, list):
            if not all(part.get("type") == "text" and isinstance(part.get("text"), str) for part in self.content):
                raise APIError(400, f"messages[{index}]: only text content is supported", "invalid_request_error",
                               param="messages")
            return {"role": self.role, "content": "".join(part["text"] for part in self.content)}
        return {"role": self.role, "content": self.content or ""}


class ChatRequest(SamplingBody):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None  # the newer name of max_tokens
    logprobs: bool = False

    def arguments(self, default_max_tokens: int) -> dict:
        args = super().arguments(default_max_tokens)
        if self.max_completion_tokens is not None:
            args["max_new_tokens"] = self.max_completion_tokens
        return args

    def prompts(self) -> list[dict]:
        return [{"messages": [m.plain(i) for i, m in enumerate(self.messages)]}]


class Reply:
    """One response's bodies: its id, time and model are shared by every chunk of a stream."""

    def __init__(self, kind: Literal["completion", "chat"], model: str):
        self.kind = kind
        self.model = model
        self.id = ("cmpl-" if kind == "completion" else "chatcmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _head(self, chunk: bool) -> dict:
        kind = "text_completion" if self.kind == "completion" else "chat.completion" + (".chunk" if chunk else "")
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def body(self, results: list[GenerationResult]) -> dict:
        choices = [self._choice(i, r.text, r.finish_reason, r.stats, chunk=False) for i, r in enumerate(results)]
        return {**self._head(False), "choices": choices, "usage": usage(results)}

    def chunk(self, index: int, text: str, result: GenerationResult | None = None, first: bool = False) -> dict:
        """A stream chunk of one choice: new text, and at the end (result given) its finish reason and stats. A
        chat's first chunk names the role, as OpenAI's do."""
        choice = self._choice(index, text, result.finish_reason if result else None, result.stats if result else None,
                              chunk=True)
        if first and self.kind == "chat":
            choice["delta"] = {"role": "assistant", "content": text}
        return {**self._head(True), "choices": [choice]}

    def usage_chunk(self, results: list[GenerationResult]) -> dict:
        return {**self._head(True), "choices": [], "usage": usage(results)}

    def _choice(self, index: int, text: str, finish_reason: str | None, stats: dict | None, chunk: bool) -> dict:
        if self.kind == "completion":
            choice = {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}
        elif chunk:
            choice = {"index": index, "delta": {"content": text} if text else {}, "logprobs": None,
                      "finish_reason": finish_reason}
        else:
            choice = {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish_reason}
        if stats is not None:
            choice["speculation"] = {name: stats.get(name, 0) for name in SPECULATION_STATS}
        return choice


def usage(results: list[GenerationResult]) -> dict:
    prompt = sum(len(r.prompt_ids) for r in results)
    completion = sum(len(r.token_ids) for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def models_body(model: str, created: int) -> dict:
    return {"object": "list", "data": [{"id": model, "object": "model", "created": created, "owned_by": "amusd-mq"}]}
