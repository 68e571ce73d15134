"""12-factor configuration: every setting is an AMUSD_* environment variable and the matching CLI flag.

SETTINGS is the single list; .env.example, the README table and the CLI flags are all checked against it.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, fields

COORDINATOR, DRAFT, VERIFY, GATEWAY, CLIENT = "coordinator", "draft", "verify", "gateway", "client"
WORKERS = (DRAFT, VERIFY)
SERVICES = (COORDINATOR, DRAFT, VERIFY)
CLIENTS = (GATEWAY, CLIENT)  # what connects to the coordinator as a client


class ConfigurationError(Exception):
    """A service can't serve as configured (it can't listen, or the coordinator refused it): restarting it
    unchanged would not help, so it exits with code 2."""


@dataclass(frozen=True)
class Setting:
    name: str
    default: object
    help: str
    used_by: tuple[str, ...]

    @property
    def env(self) -> str:
        return "AMUSD_" + self.name.upper()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


ALL = (COORDINATOR, DRAFT, VERIFY, *CLIENTS)
SETTINGS = (
    Setting("coordinator_url", "tcp://127.0.0.1:5550",
            "The coordinator's ROUTER address; its PUB socket is on the next port (ipc: path + '.pub').", ALL),
    Setting("draft_model", "qwen2.5-coder-0.5b-instruct", "Draft model: alias, local directory or HF hub id.",
            (DRAFT,)),
    Setting("verify_model", "qwen2.5-coder-1.5b-instruct", "Verify model: alias, local directory or HF hub id. The "
            "coordinator loads its tokenizer and admits only workers with the same vocabulary.", (COORDINATOR, VERIFY)),
    Setting("draft_device", "cpu", "Torch device of the draft model (cpu, cuda:N).", (DRAFT,)),
    Setting("verify_device", "cpu", "Torch device of the verify model (cpu, cuda:N).", (VERIFY,)),
    Setting("dtype", "bfloat16", "Model dtype: float32, bfloat16 or float16.", WORKERS),
    Setting("runner", "native", "What computes the forward passes: native (a purpose-built forward over a slot KV "
            "cache, CUDA-graphed on a GPU) or hf (transformers, the reference). A model the native runner doesn't "
            "know falls back to hf with a log line, unless native is set explicitly.", WORKERS),
    Setting("max_context", 4096, "Longest sequence (prompt plus output) a worker holds; the KV cache is sized for it "
            "(capped at the model's own context).", WORKERS),
    Setting("max_batch", 16, "Requests a worker serves at once, all in one batched forward pass per step; its KV cache "
            "holds a slot for each. The coordinator queues the rest.", WORKERS),
    Setting("lookahead", 8, "Most draft tokens in flight past the committed position (per-request override); "
            "under load the verifier asks for fewer, down to none, where they would cost more than they earn.",
            (COORDINATOR,)),
    Setting("threads", 0, "Torch CPU threads per worker (0: torch's default).", WORKERS),
    Setting("heartbeat_s", 1.0, "Heartbeat interval, in seconds. The coordinator's rules: it hands it to every worker "
            "and client that connects; a worker's own only paces its first registration.", SERVICES),
    Setting("liveness", 5, "Heartbeats missed before a peer is presumed dead; the coordinator's rules, as for "
            "AMUSD_HEARTBEAT_S.", SERVICES),
    Setting("max_message_bytes", 4 << 20, "Largest frame any socket accepts; larger ones are rejected.", ALL),
    Setting("max_queue", 1024, "Most requests waiting for a verifier, all clients together; more are refused "
            "(queue_full).", (COORDINATOR,)),
    Setting("max_client_requests", 256, "Most requests one client connection may have in flight; more are refused "
            "(too_many_requests). Clients take turns in the queue.", (COORDINATOR,)),
    Setting("curve_secret_key", "", "CURVE: this service's or client's secret key file (amusd-mq keygen); empty: "
            "no encryption or authentication.", ALL),
    Setting("curve_server_key", "", "CURVE: the coordinator's public key file.", (DRAFT, VERIFY, *CLIENTS)),
    Setting("curve_allow_dir", "", "CURVE: directory of the public key files the coordinator admits.", (COORDINATOR,)),
    Setting("failover_s", 10.0, "How long a request whose verifier was lost waits for another one to resume it "
            "before it fails, carrying its committed tokens.", (COORDINATOR,)),
    Setting("progress_timeout_s", 30.0, "A verifier that commits nothing for this long is sent its request again; "
            "after a second time it is dropped as hung and the request moves on. Allow for the longest prefill.",
            (COORDINATOR,)),
    Setting("queue_timeout_s", 60.0, "How long a request waits for a verify worker while none is registered (the "
            "services are starting, or every verifier was lost) before it fails with no_worker.", (COORDINATOR,)),
    Setting("timeout_s", 60.0, "Client: seconds of silence from the coordinator before a request fails.", CLIENTS),
    Setting("http_host", "127.0.0.1", "Gateway: the address the OpenAI-compatible HTTP server listens on.",
            (GATEWAY,)),
    Setting("http_port", 8000, "Gateway: the HTTP port.", (GATEWAY,)),
    Setting("api_key", "", "Gateway: when set, every request but /health and /metrics must carry "
            "'Authorization: Bearer <key>'.", (GATEWAY,)),
    Setting("cache_dir", "~/.cache/amusd-mq", "Where converted models are kept.", SERVICES),
    Setting("log_level", "INFO", "Python logging level.", ALL),
    Setting("trace_compute", "latency:profile.json",
            "For trace:FILE models: latency:PROFILE.json (sleeps) or shape:DRAFT,VERIFY (random-weight forwards, "
            "e.g. shape:llama-3.2-1b,llama-3.1-8b).", WORKERS),
    Setting("draft_delay_ms", 0.0, "Fault injection: extra milliseconds per draft step.", (DRAFT,)),
    Setting("verify_delay_ms", 0.0, "Fault injection: extra milliseconds per verify step.", (VERIFY,)),
    Setting("verify_hang_after", 0, "Fault injection: after this many forward passes the verifier's model thread "
            "hangs, while its heartbeats go on (0: never).", (VERIFY,)),
    Setting("draft_wrong", False, "Fault injection: the draft proposes a token it knows is wrong.", (DRAFT,)),
    Setting("fault_drop", 0.0, "Fault injection: probability that a service drops a message it sends to another "
            "service (not to clients).", SERVICES),
    Setting("fault_dup", 0.0, "Fault injection: probability that such a message is sent twice.", SERVICES),
    Setting("fault_delay", 0.0, "Fault injection: probability that such a message is held back (so later ones "
            "overtake it).", SERVICES),
    Setting("fault_delay_ms", 20.0, "Fault injection: the longest hold, in milliseconds.", SERVICES),
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
    draft_wrong: bool
    fault_drop: float
    fault_dup: float
    fault_delay: float
    fault_delay_ms: float
    fault_seed: int

    def __post_init__(self):
        checks = {
            "lookahead": self.lookahead >= 1, "threads": self.threads >= 0, "runner": self.runner in ("native", "hf"),
            "max_context": self.max_context >= 16, "max_batch": self.max_batch >= 1,
            "heartbeat_s": self.heartbeat_s > 0,
            "liveness": self.liveness >= 1, "max_message_bytes": self.max_message_bytes >= 1024,
            "max_queue": self.max_queue >= 1, "max_client_requests": self.max_client_requests >= 1,
            "timeout_s": self.timeout_s > 0, "failover_s": self.failover_s >= 0,
            "queue_timeout_s": self.queue_timeout_s >= 0, "http_port": 0 <= self.http_port < 65536,
            "draft_delay_ms": self.draft_delay_ms >= 0, "verify_delay_ms": self.verify_delay_ms >= 0,
            "progress_timeout_s": self.progress_timeout_s > 0, "fault_delay_ms": self.fault_delay_ms >= 0,
            "verify_hang_after": self.verify_hang_after >= 0,
            **{name: 0 <= getattr(self, name) <= 1 for name in ("fault_drop", "fault_dup", "fault_delay")},
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"{BY_NAME[name].env}={getattr(self, name)!r} is out of range")

    @property
    def heartbeat_expiry_s(self) -> float:
        return self.heartbeat_s * self.liveness

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
                                help=f"{s.help} [env {s.env}, default {s.default}]")


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
