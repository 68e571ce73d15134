"""Replaying a real pair's token decisions with the compute of any other model.

A trace holds, for each prompt, the verify model's greedy output y and the draft's teacher-forced guess
d_i for each position i (its greedy choice given prompt + y[:i]). With chain drafting only the first
wrong guess matters, so these fix the outcome of every greedy schedule. A
TraceLM is a drop-in model whose choices come from the trace and whose time comes from a latency profile
(sleeps of t_d and t_v(n)) or from a real forward pass of a random-weight model of a given shape.

This module is also the plugin (amusd_mq.models) that serves models named `trace:FILE` to the services a
benchmark starts: `model` and `vocabulary` below.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ..config import TRACE_COMPUTE
from ..runtime.hf import HFLM
from ..runtime.lm import DTYPES, LM, Feed, ModelInfo, Session
from ..runtime.native import NativeLM, NativeModel
from ..text.vocab import Vocabulary
from .baselines import autoregressive

PREFIX = "trace:"  # a model name replaying a recorded trace: prompt ids only, no tokenizer
SHAPES = {  # hidden, layers, heads, kv heads, intermediate, vocab
    "tiny": (64, 2, 4, 2, 128, 512),
    "llama-3.2-1b": (2048, 16, 32, 8, 8192, 128256),
    "llama-3.1-8b": (4096, 32, 32, 8, 14336, 128256),
}


@dataclass
class TracedPrompt:
    id: str
    prompt_ids: list[int]
    target: list[int]  # the verify model's greedy output
    draft: list[int]  # draft[i]: the draft's greedy guess for target[i] given prompt + target[:i]

    def matches(self) -> list[bool]:
        """Whether each teacher-forced guess is the verify model's token."""
        return [d == t for d, t in zip(self.draft, self.target)]

    def acceptance(self) -> float:
        return sum(self.matches()) / max(1, len(self.target))


@dataclass
class Trace:
    draft_model: str
    verify_model: str
    dtype: str
    vocab_size: int
    eos_token_ids: list[int]
    max_new_tokens: int
    prompts: list[TracedPrompt]

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self)))

    @classmethod
    def load(cls, path: str | Path) -> "Trace":
        raw = json.loads(Path(path).read_text())
        raw["prompts"] = [TracedPrompt(**p) for p in raw["prompts"]]
        return cls(**raw)

    def acceptance(self) -> float:
        """Fraction of positions where the draft's teacher-forced guess is the verify model's token."""
        return sum(sum(p.matches()) for p in self.prompts) / max(1, sum(len(p.target) for p in self.prompts))


def spend(seconds: float) -> None:
    """Exactly `seconds` of emulated compute: time.sleep alone overshoots by ~0.1 ms, a cost the ideal doesn't
    have, so the last stretch yields in a loop (releasing the GIL) until the deadline."""
    deadline = time.perf_counter() + seconds
    time.sleep(max(0.0, seconds - 0.0003))
    while time.perf_counter() < deadline:
        time.sleep(0)


def trace_prompt(draft_lm, pid: str, prompt_ids: list[int], target: list[int], sampling=None) -> TracedPrompt:
    """One teacher-forced draft pass over the verify model's output gives every guess at once (greedy, or
    seeded: the same noise as the verifier's)."""
    seq, n = prompt_ids + target[:-1], len(target)
    if sampling is None or sampling.mode == "greedy":
        return TracedPrompt(pid, prompt_ids, target, draft_lm.session().greedy(seq, n))
    return TracedPrompt(pid, prompt_ids, target, sampling.choose(draft_lm.session().logits(seq, n), list(range(n))))


def record(draft_lm, verify_lm, prompts: list[tuple[str, list[int]]], max_new_tokens: int, dtype: str,
           progress=None) -> Trace:
    traced = []
    for pid, ids in prompts:
        target = autoregressive(verify_lm, ids, max_new_tokens, verify_lm.eos_token_ids).token_ids
        traced.append(trace_prompt(draft_lm, pid, ids, target))
        if progress:
            progress.update(1)
    return Trace(draft_lm.name, verify_lm.name, dtype, verify_lm.vocab_size, verify_lm.eos_token_ids,
                 max_new_tokens, traced)


@dataclass
class LatencyProfile:
    """Step times in ms: the draft's per token, the verifier's by number of tokens fed (linear between)."""
    draft_ms: float
    verify_ms: dict[int, float]

    @classmethod
    def load(cls, path: str | Path) -> "LatencyProfile":
        raw = json.loads(Path(path).read_text())
        return cls(float(raw["draft_ms"]), {int(k): float(v) for k, v in raw["verify_ms"].items()})

    def verify(self, n: int) -> float:
        points = sorted(self.verify_ms.items())
        if len(points) == 1 or n <= points[0][0]:
            return points[0][1]
        for (n0, t0), (n1, t1) in zip(points, points[1:]):
            if n <= n1:
                return t0 + (t1 - t0) * (n - n0) / (n1 - n0)
        (n0, t0), (n1, t1) = points[-2:]
        return t1 + (t1 - t0) * (n - n1) / (n1 - n0)

    def step_ms(self, role: str, n: int) -> float:
        return self.draft_ms if role == "draft" else self.verify(n)


def shaped_lm(shape: str, runner: str, device: str, dtype: str, slots: int, max_context: int,
              kernels: str = "auto", quant: str = "none") -> LM:
    """A random-weight Llama of one of SHAPES, computed by `runner`: the cost of a real model of that size."""
    hidden, layers, heads, kv, inter, vocab = SHAPES[shape]
    config = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv, intermediate_size=inter, vocab_size=vocab,
                         max_position_embeddings=max_context)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(DTYPES[dtype])  # made in its dtype: an 8B model in float32 would take 32 GB first
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(previous)
    info = ModelInfo(name=f"shape:{shape}", vocab_size=vocab, max_context=max_context, eos_token_ids=[], vocab_hash="")
    if runner == "native":
        return NativeLM(NativeModel(config, model.state_dict(), torch.device(device), DTYPES[dtype], slots,
                                    max_context, kernels, quant), info)
    return HFLM(model, info, slots)


def trace_hash(verify_model: str, vocab_size: int) -> str:
    """A trace replays the ids of the model it was recorded from; its name and size stand for its mapping."""
    return hashlib.sha256(f"{verify_model}/{vocab_size}".encode()).hexdigest()


def vocabulary(name: str) -> Vocabulary:
    """The plugin's vocabulary of `trace:FILE`: ids only, named by the model the trace was recorded from."""
    trace = Trace.load(name[len(PREFIX):])
    return Vocabulary(trace_hash(trace.verify_model, trace.vocab_size), None)


def model(cfg, role: str) -> "TraceLM":
    """The plugin's model of `trace:FILE` for a worker of `role`, as the settings describe its compute."""
    name, device = cfg.model_of(role)
    return TraceLM(name, role, cfg.trace_compute, cfg.runner, device, cfg.dtype, cfg.max_batch, cfg.max_context,
                   cfg.kernels)


class TraceLM(LM):
    """A model whose greedy choices come from a trace and whose time comes from a latency profile ("latency:
    PROFILE.json": sleeps) or from a real forward pass of a random-weight model of a given shape ("shape:DRAFT,
    VERIFY", computed by the configured runner). The role picks its half."""

    def __init__(self, spec: str, role: str, compute: str, runner: str, device: str = "cpu", dtype: str = "bfloat16",
                 slots: int = 4, max_context: int = 4096, kernels: str = "auto"):
        self.trace = Trace.load(spec[len(PREFIX):])
        self.role = role
        kind, _, arg = compute.partition(":")
        self.profile = self.compute = None
        if kind == "latency":
            self.profile = LatencyProfile.load(arg)
            self.runner = self.kernels = "latency"
        elif kind == "shape":
            self.compute = shaped_lm(arg.split(",")[0 if role == "draft" else 1], runner, device, dtype, slots,
                                     max_context, kernels)
            self.runner, self.kernels = self.compute.runner, self.compute.kernels
        else:
            raise ValueError(f"trace compute must be {TRACE_COMPUTE}, not {compute!r}")
        super().__init__(ModelInfo(name=spec, vocab_size=self.trace.vocab_size,
                                   max_context=max_context if self.compute else 1 << 20,
                                   eos_token_ids=self.trace.eos_token_ids,
                                   vocab_hash=trace_hash(self.trace.verify_model, self.trace.vocab_size)), slots)

    def session(self) -> "TraceSession":
        return TraceSession(self)

    def warm_up(self) -> None:
        if self.compute is not None:
            self.compute.warm_up()

    def logits(self, feeds: list[Feed]):
        raise NotImplementedError("a trace records greedy choices only")

    def time_pass(self, rows: int, width: int, context: int = 64) -> float:
        if self.compute is not None:
            return self.compute.time_pass(rows, width, context)
        return self.profile.step_ms(self.role, rows * width)

    def greedy(self, feeds: list[Feed]) -> list[list[int]]:
        """The trace's choices, after spending one batched pass's time: a real forward at the compute shape, or
        the latency profile's time for all the tokens fed."""
        out = [f.session.choices(f.seq, f.n_out) for f in feeds]
        if self.compute is not None:
            vocab = self.compute.vocab_size
            self.compute.logits([Feed(f.session.compute, [t % vocab for t in f.seq], f.n_out) for f in feeds])
        else:
            spend(self.profile.step_ms(self.role, sum(len(f.seq) - f.start for f in feeds)) / 1000)
        for f in feeds:
            f.session.length = len(f.seq)
        return out


class TraceSession(Session):
    """Replays the trace's choices for one prompt; spends the time its compute model takes for the same feed."""

    def __init__(self, lm: TraceLM):
        super().__init__(lm)
        self.record: TracedPrompt | None = None
        self.compute = lm.compute.session() if lm.compute is not None else None

    def close(self) -> None:
        if self.compute is not None:
            self.compute.close()
        super().close()

    def rollback(self, length: int) -> None:
        super().rollback(length)
        if self.compute is not None:
            self.compute.rollback(length)

    def choices(self, seq: list[int], n_out: int) -> list[int]:
        lm = self.lm
        if self.record is None:
            self.record = next((r for r in lm.trace.prompts if seq[:len(r.prompt_ids)] == r.prompt_ids), None)
            if self.record is None:
                raise KeyError("prompt not in the trace")
        gen = seq[len(self.record.prompt_ids):]
        target = self.record.target
        on_path = next((i for i, (a, b) in enumerate(zip(gen, target)) if a != b), min(len(gen), len(target)))
        choices = self.record.draft if lm.role == "draft" else target
        out = []
        for j in range(len(gen) - n_out + 1, len(gen) + 1):
            if j < len(target) and j <= on_path:
                out.append(choices[j])
            else:  # off the recorded path only the first wrong guess matters; anything the verifier rejects will do
                out.append((target[j] + 1) % lm.vocab_size if j < len(target) else 0)
        return out
