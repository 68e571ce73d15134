"""12-factor configuration: every setting is an AMUSD_* environment variable and the matching CLI flag.

SETTINGS is the single list; .env.example, the README table and the CLI flags are all checked against it. Each
setting's bound lives here too: a value past it is refused when the setting is read, so every service refuses to
start (exit code 2) with a value that a request or a worker would refuse later, and whatever checks a request
against a setting's bound (the coordinator, the client) takes it from here.
"""
from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass, fields
from urllib.parse import urlsplit

from .wire.codes import Role

COORDINATOR, DRAFT, VERIFY, GATEWAY, CLIENT = Role.COORDINATOR, Role.DRAFT, Role.VERIFY, Role.GATEWAY, Role.CLIENT
WORKERS = (DRAFT, VERIFY)
SERVICES = (COORDINATOR, DRAFT, VERIFY)
CLIENTS = (GATEWAY, CLIENT)  # what connects to the coordinator as a client
DTYPES = ("float32", "bfloat16", "float16")
RUNNERS = ("native", "hf")
KERNELS = ("auto", "aten", "onednn")  # auto, or one of runtime.kernels.PATHS
QUANTS = ("none", "int8", "int4")  # none, or one of runtime.kernels.QUANTIZED
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class ConfigurationError(Exception):
    """A service can't serve as configured (it can't listen, or the coordinator refused it): restarting it
    unchanged would not help, so it exits with code 2."""


def pub_url(url: str) -> str:
    """The coordinator's PUB address, derived from its ROUTER address so one URL configures everything."""
    parts = urlsplit(url)
    if parts.scheme == "tcp":
        host, _, port = parts.netloc.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65535:
            raise ValueError(f"{url}: a tcp address needs a host and a port below 65535")
        return f"tcp://{host}:{int(port) + 1}"
    if parts.scheme in ("ipc", "inproc") and len(url) > len(parts.scheme) + 3:
        return url + ".pub"
    raise ValueError(f"{url}: unsupported address (use tcp://HOST:PORT, ipc://PATH or inproc://NAME)")


@dataclass(frozen=True)
class Range:
    """Numbers from low (excluded when `above`) up to high."""
    low: float
    high: float | None = None
    above: bool = False

    def admits(self, value) -> bool:
        return (value > self.low if self.above else value >= self.low) and (self.high is None or value <= self.high)

    def __str__(self) -> str:
        if self.high is not None:
            return f"in [{self.low:g}, {self.high:g}]"
        return f"{'above' if self.above else 'at least'} {self.low:g}"


@dataclass(frozen=True)
class OneOf:
    options: tuple[str, ...]
    fold: bool = False  # compared case-insensitively (the options are upper case)

    def admits(self, value) -> bool:
        return (value.upper() if self.fold else value) in self.options

    def __str__(self) -> str:
        return "one of " + ", ".join(self.options)


@dataclass(frozen=True)
class Matches:
    """Text of a given form: a regular expression, or a function that raises ValueError on what it refuses."""
    form: str
    pattern: str | None = None
    parse: object = None

    def admits(self, value) -> bool:
        if self.parse is not None:
            try:
                self.parse(value)
            except ValueError:
                return False
            return True
        return re.fullmatch(self.pattern, value) is not None

    def __str__(self) -> str:
        return self.form


@dataclass(frozen=True)
class Setting:
    name: str
    default: object
    help: str
    used_by: tuple[str, ...]
    bound: Range | OneOf | Matches | None = None

    @property
    def env(self) -> str:
        return "AMUSD_" + self.name.upper()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def limits(self) -> str:
        return f", {self.bound}" if self.bound is not None else ""

    def check(self, value) -> None:
        if self.bound is not None and not self.bound.admits(value):
            raise ValueError(f"{self.env} (flag {self.flag}) must be {self.bound}, not {value!r}")


def frame_floor(max_context: int) -> int:
    """The smallest frame limit that fits every message of a sequence of max_context tokens: an assignment or a
    `done` carries the whole sequence (at most 5 bytes a token id), and 64 KiB holds an exact-mode proposal of 64
    tokens with 32 (id, probability) pairs each."""
    return 5 * max_context + (64 << 10)


AT_LEAST_0, ABOVE_0, PROBABILITY = Range(0), Range(0, above=True), Range(0, 1)
NAME = Matches("a model name (not blank)", r".*\S.*")
DEVICE = Matches("cpu, cuda or cuda:N", r"cpu|cuda(:\d+)?")
TRACE_COMPUTE = Matches("latency:PROFILE.json or shape:DRAFT,VERIFY", r"latency:.+|shape:[^,]+,[^,]+")
ALL = (COORDINATOR, DRAFT, VERIFY, *CLIENTS)
SETTINGS = (
    Setting("coordinator_url", "tcp://127.0.0.1:5550",
            "The coordinator's ROUTER address; its PUB socket is on the next port (ipc: path + '.pub').", ALL,
            Matches("tcp://HOST:PORT, ipc://PATH or inproc://NAME", parse=pub_url)),
    Setting("draft_model", "qwen2.5-coder-0.5b-instruct", "Draft model: alias, local directory or HF hub id.",
            (DRAFT,), NAME),
    Setting("verify_model", "qwen2.5-coder-1.5b-instruct", "Verify model: alias, local directory or HF hub id. The "
            "coordinator loads its tokenizer and admits only workers with the same vocabulary.", (COORDINATOR, VERIFY),
            NAME),
    Setting("draft_device", "cpu", "Torch device of the draft model.", (DRAFT,), DEVICE),
    Setting("verify_device", "cpu", "Torch device of the verify model.", (VERIFY,), DEVICE),
    Setting("dtype", "bfloat16", "Model dtype.", WORKERS, OneOf(DTYPES)),
    Setting("runner", "native", "What computes the forward passes: native (a purpose-built forward over a slot KV "
            "cache, CUDA-graphed on a GPU) or hf (transformers, the reference). A model the native runner doesn't "
            "know falls back to hf with a log line, unless native is set explicitly.", WORKERS, OneOf(RUNNERS)),
    Setting("kernels", "auto", "What computes the native runner's linear layers: auto (each layer shape timed at "
            "load on every path the machine offers, the fastest kept among those whose results don't depend on the "
            "batch, as the worker logs), aten (torch's F.linear) or onednn (oneDNN, the weights prepacked once; CPU "
            "only). Reported as path/rows: inputs of fewer rows are padded to that many.", WORKERS,
            OneOf(KERNELS)),
    Setting("draft_quant", "none", "Weight-only quantization of the draft model's linear layers, native runner only: "
            "none, int8 (a scale per output channel) or int4 (a scale and zero per 32 inputs; CPU). The output stays "
            "the verify model's; only how often the draft guesses right changes.", (DRAFT,), OneOf(QUANTS)),
    Setting("verify_quant", "none", "Weight-only quantization of the verify model's linear layers, as for the "
            "draft: the model served is then the quantized one, and the output is its own greedy output, not the "
            "unquantized model's.", (VERIFY,), OneOf(QUANTS)),
    Setting("max_context", 4096, "Longest sequence (prompt plus output) a worker holds; the KV cache is sized for it "
            "(capped at the model's own context).", WORKERS, Range(16)),
    Setting("max_batch", 16, "Requests a worker serves at once, all in one batched forward pass per step; its KV cache "
            "holds a slot for each. The coordinator queues the rest.", WORKERS, Range(1)),
    Setting("lookahead", 8, "Most draft tokens in flight past the committed position (per-request override); "
            "under load the verifier asks for fewer, down to none, where they would cost more than they earn.",
            (COORDINATOR,), Range(1, 64)),
    Setting("threads", 0, "Torch CPU threads per worker (0: the cores this process may run on, shared among the "
            "workers whose devices are cpu: on a host that runs one CPU worker of two, set it).", WORKERS, AT_LEAST_0),
    Setting("heartbeat_s", 1.0, "Heartbeat interval, in seconds. The coordinator's rules: it hands it to every worker "
            "and client that connects; a worker's own only paces its first registration.", SERVICES, ABOVE_0),
    Setting("liveness", 5, "Heartbeats missed before a peer is presumed dead; the coordinator's rules, as for "
            "AMUSD_HEARTBEAT_S.", SERVICES, Range(1)),
    Setting("max_message_bytes", 4 << 20, "Largest frame any socket accepts; larger ones are rejected.", ALL, Range(1024)),
    Setting("max_queue", 1024, "Most requests waiting for a verifier, all clients together; more are refused "
            "(queue_full).", (COORDINATOR,), Range(1)),
    Setting("max_client_requests", 256, "Most requests one client connection may have in flight; more are refused "
            "(too_many_requests). Clients take turns in the queue.", (COORDINATOR,), Range(1)),
    Setting("curve_secret_key", "", "CURVE: this service's or client's secret key file (amusd-mq keygen); empty: "
            "no encryption or authentication.", ALL),
    Setting("curve_server_key", "", "CURVE: the coordinator's public key file.", (DRAFT, VERIFY, *CLIENTS)),
    Setting("curve_allow_dir", "", "CURVE: directory of the public key files the coordinator admits.", (COORDINATOR,)),
    Setting("failover_s", 10.0, "How long a request whose verifier was lost waits for another one to resume it "
            "before it fails, carrying its committed tokens.", (COORDINATOR,), AT_LEAST_0),
    Setting("progress_timeout_s", 30.0, "A verifier that commits nothing for this long is sent its request again; "
            "after a second time it is dropped as hung and the request moves on. Allow for the longest prefill.",
            (COORDINATOR,), ABOVE_0),
    Setting("queue_timeout_s", 60.0, "How long a request waits for a verify worker while none is registered (the "
            "services are starting, or every verifier was lost) before it fails with no_worker.", (COORDINATOR,),
            AT_LEAST_0),
    Setting("timeout_s", 60.0, "Client: seconds of silence from the coordinator before a request fails.", CLIENTS, ABOVE_0),
    Setting("http_host", "127.0.0.1", "Gateway: the address the OpenAI-compatible HTTP server listens on.",
            (GATEWAY,)),
    Setting("http_port", 8000, "Gateway: the HTTP port (0: any free one).", (GATEWAY,), Range(0, 65535)),
    Setting("api_key", "", "Gateway: when set, every request but /health and /metrics must carry "
            "'Authorization: Bearer <key>'.", (GATEWAY,)),
    Setting("cache_dir", "~/.cache/amusd-mq", "Where converted models are kept.", SERVICES),
    Setting("log_level", "INFO", "Python logging level.", ALL, OneOf(LOG_LEVELS, fold=True)),
    Setting("trace_compute", "latency:profile.json", "For trace:FILE models: where a step's time goes, sleeping "
            "as a latency profile says (latency:PROFILE.json) or in forwards of random-weight models of the given "
            "shapes (shape:DRAFT,VERIFY, e.g. shape:llama-3.2-1b,llama-3.1-8b).", WORKERS, TRACE_COMPUTE),
    Setting("draft_delay_ms", 0.0, "Fault injection: extra milliseconds per draft step.", (DRAFT,), AT_LEAST_0),
    Setting("verify_delay_ms", 0.0, "Fault injection: extra milliseconds per verify step.", (VERIFY,), AT_LEAST_0),
    Setting("verify_hang_after", 0, "Fault injection: after this many forward passes the verifier's model thread "
            "hangs, while its heartbeats go on (0: never).", (VERIFY,), AT_LEAST_0),
    Setting("fail_token", -1, "Fault injection: a worker's forward pass raises whenever one of its sequences holds "
            "this token id (-1: never).", WORKERS, Range(-1)),
    Setting("draft_wrong", False, "Fault injection: the draft proposes a token it knows is wrong.", (DRAFT,)),
    Setting("fault_drop", 0.0, "Fault injection: probability that a service drops a message it sends to another "
            "service (not to clients).", SERVICES, PROBABILITY),
    Setting("fault_dup", 0.0, "Fault injection: probability that such a message is sent twice.", SERVICES, PROBABILITY),
    Setting("fault_delay", 0.0, "Fault injection: probability that such a message is held back (so later ones "
            "overtake it).", SERVICES, PROBABILITY),
    Setting("fault_delay_ms", 20.0, "Fault injection: the longest hold, in milliseconds.", SERVICES, AT_LEAST_0),
    Setting("fault_seed", 0, "Fault injection: seed of the faults' random choices.", SERVICES),
)
BY_NAME = {s.name: s for s in SETTINGS}


@dataclass(frozen=True)
class Config:
    coordinator_url: str
    draft_model: str
    verify_model: str
    draft_device: str
    verify_device: str
    dtype: str
    runner: str
    kernels: str
    draft_quant: str
    verify_quant: str
    max_context: int
    max_batch: int
    lookahead: int
    threads: int
    heartbeat_s: float
    liveness: int
    max_message_bytes: int
    max_queue: int
    max_client_requests: int
    curve_secret_key: str
    curve_server_key: str
    curve_allow_dir: str
    failover_s: float
    progress_timeout_s: float
    queue_timeout_s: float
    timeout_s: float
    http_host: str
    http_port: int
    api_key: str
    cache_dir: str
    log_level: str
    trace_compute: str
    draft_delay_ms: float
    verify_delay_ms: float
    verify_hang_after: int
    fail_token: int
    draft_wrong: bool
    fault_drop: float
    fault_dup: float
    fault_delay: float
    fault_delay_ms: float
    fault_seed: int

    def __post_init__(self):
        for s in SETTINGS:
            s.check(getattr(self, s.name))
        floor = frame_floor(self.max_context)
        if self.max_message_bytes < floor:
            raise ValueError(f"AMUSD_MAX_MESSAGE_BYTES (flag --max-message-bytes) must be at least {floor} for "
                             f"AMUSD_MAX_CONTEXT={self.max_context}, not {self.max_message_bytes}: an assignment "
                             f"carries a whole sequence")

    @property
    def heartbeat_expiry_s(self) -> float:
        return self.heartbeat_s * self.liveness

    def threads_of(self, role: str) -> int:
        """Torch CPU threads of a worker of `role`: AMUSD_THREADS, else the cores this process may run on shared
        among the workers configured on CPU devices, so that the draft and the verifier of one host never
        oversubscribe it (two CPU workers of 2 threads each on 2 cores ran 3.4x slower than 1 + 1). A worker on a
        GPU takes one: its CPU work is launching kernels."""
        if self.threads:
            return self.threads
        devices = [self.model_of(r)[1] for r in WORKERS]
        if self.model_of(role)[1] != "cpu":
            return 1
        cores = len(os.sched_getaffinity(0))
        return max(1, (cores - sum(d != "cpu" for d in devices)) // devices.count("cpu"))

    def quant_of(self, role: str) -> str:
        return self.draft_quant if role == DRAFT else self.verify_quant

    def model_of(self, role: str) -> tuple[str, str]:
        """The model a worker of `role` serves, and its device."""
        return (self.draft_model, self.draft_device) if role == DRAFT else (self.verify_model, self.verify_device)


def _parse(setting: Setting, raw: str):
    kind = type(setting.default)
    if kind is bool:
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(f"{setting.env}: expected a boolean, got {raw!r}")
    try:
        return kind(raw)
    except ValueError:
        raise ValueError(f"{setting.env}: expected {kind.__name__}, got {raw!r}") from None


def add_flags(parser: argparse.ArgumentParser, role: str | None = None) -> None:
    """Add the flags a role uses (all of them when role is None); each defaults to its environment variable."""
    for s in SETTINGS:
        if role is None or role in s.used_by:
            parser.add_argument(s.flag, dest=s.name, default=None, metavar=type(s.default).__name__.upper(),
                                help=f"{s.help} [env {s.env}, default {s.default}{s.limits}]")


def env_example() -> str:
    """The text of .env.example: every setting with its help, bound, users and default."""
    head = ("# amusd-mq configuration. Every variable is also a CLI flag (AMUSD_FOO_BAR <-> --foo-bar); flags win.\n"
            "# Used by: which services read it. Copy to .env for honcho.\n")
    blocks = [f"# {s.help}{s.limits and ' Must be ' + str(s.bound) + '.'} Used by: {', '.join(s.used_by)}.\n"
              f"{s.env}={str(s.default).lower() if isinstance(s.default, bool) else s.default}\n" for s in SETTINGS]
    return head + "\n" + "\n".join(blocks)


def is_set(name: str, args: argparse.Namespace | None = None, env: dict | None = None) -> bool:
    """Whether a setting was given, by flag or environment, rather than left at its default."""
    env = os.environ if env is None else env
    return getattr(args, name, None) is not None or BY_NAME[name].env in env


def load(args: argparse.Namespace | None = None, env: dict | None = None) -> Config:
    """Flags beat environment variables, which beat defaults."""
    env = os.environ if env is None else env
    values = {}
    for f in fields(Config):
        s = BY_NAME[f.name]
        flag = getattr(args, s.name, None) if args is not None else None
        if flag is not None:
            values[s.name] = _parse(s, str(flag))
        elif s.env in env:
            values[s.name] = _parse(s, env[s.env])
        else:
            values[s.name] = s.default
    values["cache_dir"] = os.path.expanduser(values["cache_dir"])
    return Config(**values)
