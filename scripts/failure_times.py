"""How long each failure takes to reach its client, through real processes on tiny fp32 models: prompts over the
frame limit (through the Python client and through the HTTP gateway), a request that breaks every pass it is in
(beside seven that don't), a worker whose every pass fails, and a service started with a setting past its bound.

    python scripts/failure_times.py [--out data/results/failure-times]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import openai

from amusd_mq import AsyncClient, models
from amusd_mq.bench.baselines import autoregressive
from amusd_mq.bench.run import cpu_line
from amusd_mq.cli.launch import Deployment
from amusd_mq.runtime.load import load
from amusd_mq.workers.step import PROBE

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["def fib(n):", "Hello, world", "import numpy as np\n", "The quick brown fox", "class Stack:\n    def push(",
           "SELECT * FROM users WHERE", "Once upon a time", "for i in range(10):", "# TODO: refactor this"]
MAX_NEW = 24


def env_for(sock_dir: str, cache: str, **extra) -> dict[str, str]:
    return {"AMUSD_COORDINATOR_URL": f"ipc://{sock_dir}/c", "AMUSD_DRAFT_MODEL": "tiny-draft",
            "AMUSD_VERIFY_MODEL": "tiny-verify", "AMUSD_DTYPE": "float32", "AMUSD_CACHE_DIR": cache,
            "AMUSD_THREADS": "1", "AMUSD_HEARTBEAT_S": "0.25", "AMUSD_LOG_LEVEL": "WARNING", **extra}


def wait_http(port: int) -> None:
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
            return
        except OSError:
            time.sleep(0.1)


async def oversized(cache: str, port: int) -> dict:
    out = {}
    sock_dir = tempfile.mkdtemp(prefix="amf-")
    with Deployment(env_for(sock_dir, cache, AMUSD_HTTP_PORT=str(port)), f"{sock_dir}/logs",
                    ("coordinator", "verify", "draft", "gateway")) as d:
        await d.wait_ready()
        await asyncio.to_thread(wait_http, port)
        http = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        async with AsyncClient(d.url, timeout_s=30) as client:
            for mib in (5, 20, 100):
                prompt = "x" * (mib << 20)
                start = time.perf_counter()
                try:
                    await client.generate(prompt, max_new_tokens=4)
                except Exception as exc:
                    out[f"client {mib} MiB"] = (time.perf_counter() - start, type(exc).__name__)
                start = time.perf_counter()
                try:
                    await asyncio.to_thread(http.completions.create, model="tiny-verify", prompt=prompt, max_tokens=4)
                except openai.APIStatusError as exc:
                    out[f"HTTP {mib} MiB"] = (time.perf_counter() - start, f"HTTP {exc.status_code}")
            start = time.perf_counter()
            await client.status()
            out["the next status()"] = (time.perf_counter() - start, "answered")
    return out


async def poisoned(cache: str, verify) -> dict:
    """A request whose output holds a token no other of the batch holds, and AMUSD_FAIL_TOKEN set to it."""
    def greedy(ids):
        return autoregressive(verify, ids, MAX_NEW, verify.eos_token_ids).token_ids

    prompts = [verify.tokenizer(q)["input_ids"] for q in PROMPTS[:7]]
    outs = [greedy(ids) for ids in prompts]
    used = set(PROBE).union(*prompts, *outs)
    for q in PROMPTS[7:]:
        bad = verify.tokenizer(q)["input_ids"]
        poison = next((t for t in greedy(bad)[2:-4] if t not in used and t not in bad), None)
        if poison is not None:
            break
    sock_dir = tempfile.mkdtemp(prefix="amf-")
    with Deployment(env_for(sock_dir, cache, AMUSD_FAIL_TOKEN=str(poison), AMUSD_MAX_BATCH="8",
                            AMUSD_VERIFY_DELAY_MS="20"), f"{sock_dir}/logs") as d:
        await d.wait_ready()
        async with AsyncClient(d.url, timeout_s=30) as client:
            start = time.perf_counter()
            others = [asyncio.create_task(client.generate(prompt_ids=ids, max_new_tokens=MAX_NEW)) for ids in prompts]
            try:
                await client.generate(prompt_ids=bad, max_new_tokens=MAX_NEW)
                failed = "not failed"
            except Exception as exc:
                failed = (f"{type(exc).__name__}({getattr(exc, 'code', '')}), "
                          f"{len(getattr(exc, 'token_ids', []))} committed tokens")
            took = time.perf_counter() - start
            results = await asyncio.gather(*others)
            same = all(r.token_ids == o for r, o in zip(results, outs))
            others_s = time.perf_counter() - start
    return {"the request that breaks its pass": (took, failed),
            "the other 7, from the same start": (others_s, "identical to greedy" if same else "DIFFERENT")}


async def unhealthy(cache: str) -> dict:
    sock_dir = tempfile.mkdtemp(prefix="amf-")
    with Deployment(env_for(sock_dir, cache, AMUSD_FAIL_TOKEN=str(PROBE[0])), f"{sock_dir}/logs",
                    ("coordinator", "verify")) as d:
        await d.wait_ready(drafts=0)
        async with AsyncClient(d.url, timeout_s=30) as client:
            start = time.perf_counter()
            for i in range(3):
                try:
                    await client.generate(prompt_ids=[PROBE[0], 30 + i], max_new_tokens=4)
                except Exception:
                    pass
            while (await client.status()).unhealthy != 1:
                await asyncio.sleep(0.01)
            return {"a worker failing every pass, seen unhealthy in status": (time.perf_counter() - start,
                                                                              "after 3 failed requests")}


def bad_setting() -> dict:
    env = {"PATH": os.environ["PATH"], "AMUSD_LOOKAHEAD": "65"}
    out = {}
    for role in ("coordinator", "verify", "draft", "gateway"):
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", f"services.{role}"], cwd=ROOT, env=env, capture_output=True)
        out[f"{role} with AMUSD_LOOKAHEAD=65"] = (time.perf_counter() - start, f"exit {proc.returncode}")
    return out


async def main(args) -> None:
    cache = tempfile.mkdtemp(prefix="amf-cache-")
    for name in models.TINY_MODELS:
        models.resolve(name, cache)
    verify = load("tiny-verify", "cpu", "float32", cache)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    figures = {**(await oversized(cache, port)), **(await poisoned(cache, verify)), **(await unhealthy(cache)),
               **bad_setting()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    host = cpu_line()
    (out / "results.json").write_text(json.dumps({"machine": host, "date": time.strftime("%Y-%m-%d"),
                                                  "figures": figures}, indent=1))
    lines = [f"Machine: {host}; {time.strftime('%Y-%m-%d')}; tiny fp32 models, heartbeat 0.25 s.", "",
             "| case | seconds | what the client saw |", "|---|---|---|"]
    lines += [f"| {case} | {s:.3f} | {what} |" for case, (s, what) in figures.items()]
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="data/results/failure-times")
    asyncio.run(main(parser.parse_args()))
