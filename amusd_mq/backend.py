"""Causal LMs with a per-sequence KV cache, and the one thread that runs them off the event loop."""
from __future__ import annotations

import asyncio
import logging
import queue
import threading

import torch

from . import models
from .sampling import GREEDY, Sampling
from .vocab import TRACE_PREFIX, tokenizer_hash

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model(name: str, role: str, device: str, dtype: str, cache_dir: str | None, trace_compute: str):
    """A real model, or with a `trace:FILE` name, a TraceLM replaying that trace."""
    from .trace import TraceLM

    if name.startswith(TRACE_PREFIX):
        return TraceLM(name, role, trace_compute, device, dtype)
    return CausalLM(name, device, dtype, cache_dir)


class CausalLM:
    def __init__(self, name: str, device: str = "cpu", dtype: str = "float32", cache_dir: str | None = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, not {dtype!r}")
        path = models.resolve(name, cache_dir)
        self.name = name
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype]).to(self.device).eval()
        config = self.model.config
        self.vocab_size = config.vocab_size
        self.max_context = config.max_position_embeddings
        eos = self.model.generation_config.eos_token_id
        self.eos_token_ids = sorted({eos} if isinstance(eos, int) else set(eos or []))

    def warm_up(self) -> None:
        """One small forward pass, so the first request doesn't pay for kernel selection and allocation."""
        self.session().greedy(list(range(8)), 2)

    def vocab_hash(self) -> str:
        return tokenizer_hash(self.tokenizer.backend_tokenizer)

    def session(self) -> "Session":
        return Session(self.model, self.device)


def reusable_prefix(cached: list[int], seq: list[int], n_out: int) -> int:
    """How much of a cache holding `cached` serves `seq`, still feeding at least the last n_out tokens."""
    keep, limit = 0, min(len(cached), len(seq) - n_out)
    while keep < limit and cached[keep] == seq[keep]:
        keep += 1
    return keep


class Session:
    """One sequence's KV cache. It remembers which tokens it holds, so callers just pass the full sequence
    they want scored and the cache is cropped to the common prefix: rollback is implicit."""

    def __init__(self, model, device: torch.device):
        from transformers import DynamicCache

        self.model = model
        self.device = device
        self.cache = DynamicCache()
        self.cached: list[int] = []

    @torch.inference_mode()
    def logits(self, seq: list[int], n_out: int) -> torch.Tensor:
        """Logits [n_out, vocab] predicting the tokens after each of the last n_out positions of seq."""
        keep = reusable_prefix(self.cached, seq, n_out)
        if keep < len(self.cached):
            self.cache.crop(keep - len(self.cached))  # a negative count works on every transformers release
            del self.cached[keep:]
        feed = torch.tensor([seq[keep:]], device=self.device)
        out = self.model(input_ids=feed, past_key_values=self.cache, use_cache=True, logits_to_keep=n_out)
        self.cached.extend(seq[keep:])
        return out.logits[0].float()

    def greedy(self, seq: list[int], n_out: int) -> list[int]:
        return self.logits(seq, n_out).argmax(-1).tolist()


def verify(session: Session, seq: list[int], draft: list[int], start: int = 0, sampling: Sampling = GREEDY,
           q: list[tuple[list[int], list[float]]] | None = None) -> tuple[list[int], int]:
    """One verify pass after `seq`, whose next token is generated position `start`: the accepted prefix of
    `draft`, plus the verifier's own next token. In greedy and seeded mode the accepted prefix is the one the
    model agrees with; in exact mode, rejection sampling against the draft's distributions `q`."""
    n = len(draft) + 1
    if sampling.mode == "exact":
        return sampling.verify_exact(session.logits(seq + draft, n), draft, start, q)
    choices = (session.greedy(seq + draft, n) if sampling.mode == "greedy" else
               sampling.choose(session.logits(seq + draft, n), list(range(start, start + n))))
    accepted = 0
    while accepted < len(draft) and draft[accepted] == choices[accepted]:
        accepted += 1
    return draft[:accepted] + [choices[accepted]], accepted


def propose(session: Session, seq: list[int], position: int,
            sampling: Sampling = GREEDY) -> tuple[int, list[int] | None, list[float] | None]:
    """The draft's next token after `seq` (generated position `position`), with its distribution in exact mode."""
    if sampling.mode == "greedy":
        return session.greedy(seq, 1)[0], None, None
    return sampling.propose(session.logits(seq, 1), position)


class ModelThread:
    """All model work runs on this one daemon thread: the event loop keeps serving sockets and heartbeats
    during a forward pass, and a shutdown never waits for one to finish."""

    def __init__(self, threads: int = 0):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = threads
        self.done = 0  # jobs finished, and whether one is running: heartbeats report both, so the
        self.busy = False  # coordinator can tell a hung forward pass from a slow or idle worker
        threading.Thread(target=self._run, name="model", daemon=True).start()

    def _run(self):
        if self._threads:
            torch.set_num_threads(self._threads)
        while True:
            loop, future, fn, args = self._jobs.get()
            self.busy = True
            try:
                outcome = (fn(*args), None)
            except BaseException as exc:  # delivered to the awaiting coroutine
                outcome = (None, exc)
            self.busy = False
            self.done += 1
            try:
                loop.call_soon_threadsafe(_settle, future, *outcome)
            except RuntimeError:  # the loop closed while this ran: nobody is waiting for the result
                pass

    def submit(self, fn, *args) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._jobs.put((loop, future, fn, args))
        return future


def _settle(future: asyncio.Future, result, exc):
    if future.cancelled():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)

