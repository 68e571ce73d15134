"""The quickstart's speed with the thread setting left at its default, beside tuned settings, in one run: `honcho
start` from the repository root with .env.example's values (the Qwen pair on CPU), then chat requests through the
official `openai` client, streamed, greedy, `ignore_eos`, one at a time, ms per token from the first streamed
token to the last. Each setting is its own honcho start, one at a time, in rounds.

    python scripts/honcho_threads.py [--rounds 2] [--tokens 64] [--out bench/results/honcho-threads]

Settings compared: the default (AMUSD_THREADS=0), the tuned one for a 2-core host (1 + 1), and 2 + 2 (what the
default gave each worker on a 2-core host before it shared the cores).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import openai

from amusd_mq.bench.run import cpu_name

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {"default (AMUSD_THREADS=0)": {}, "tuned (AMUSD_THREADS=1, 1 + 1)": {"AMUSD_THREADS": "1"},
            "2 + 2 (AMUSD_THREADS=2)": {"AMUSD_THREADS": "2"}}
CHATS = ["Write a Python function that checks whether a string is a palindrome.",
         "Explain the difference between a list and a tuple in Python.",
         "Write a SQL query that returns the ten most recent orders of each customer.",
         "How do I read a large CSV file in chunks with pandas?"]


def machine() -> str:
    flags = open("/proc/cpuinfo").read()
    isa = [f for f in ("avx512f", "avx512_bf16", "amx_bf16", "avx2") if f" {f}" in flags]
    return f"{cpu_name()}, {len(os.sched_getaffinity(0))} cores, {'/'.join(isa)}"


def wait_healthy(port: int, proc: subprocess.Popen, timeout_s: float = 900) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"honcho exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                if r.status == 200:
                    return time.monotonic() - start
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError("the deployment never became healthy")


def one_chat(client: openai.OpenAI, model: str, text: str, tokens: int) -> tuple[float, int, float]:
    """(ms per token from the first streamed token to the last, tokens, seconds to the first token)."""
    start = time.perf_counter()
    stamps = []
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}],
                                            max_tokens=tokens, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    count = 0
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            stamps.append(time.perf_counter())
        if chunk.usage is not None:
            count = chunk.usage.completion_tokens
    return (stamps[-1] - stamps[0]) * 1000 / max(1, count - 1), count, stamps[0] - start


def run_setting(name: str, extra: dict, args, logs: Path) -> dict:
    env_file = Path(tempfile.mkdtemp(prefix="amusd-honcho-")) / ".env"
    env_file.write_text((ROOT / ".env.example").read_text() + "".join(f"{k}={v}\n" for k, v in extra.items()))
    env = {k: v for k, v in os.environ.items() if not k.startswith("AMUSD_")}
    log = open(logs / f"{name.split(' (')[0].replace(' + ', '-plus-')}-{int(time.time())}.log", "wb")
    proc = subprocess.Popen(["honcho", "start", "-e", str(env_file)], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        ready_s = wait_healthy(8000, proc)
        client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused", max_retries=0, timeout=600)
        model = client.models.list().data[0].id
        one_chat(client, model, "Say hello.", 8)  # warm-up: the first request of a run pays for allocation
        runs = [one_chat(client, model, text, args.tokens) for text in CHATS]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)
        log.close()
    ms = [r[0] for r in runs]
    return {"setting": name, "ready_s": ready_s, "ms_per_token": ms, "mean_ms_per_token": sum(ms) / len(ms),
            "tokens": [r[1] for r in runs], "ttft_s": [r[2] for r in runs]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--out", default="bench/results/honcho-threads")
    args = parser.parse_args()
    out = Path(args.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    results = []
    for rnd in range(args.rounds):
        order = list(SETTINGS.items())
        for name, extra in order if rnd % 2 == 0 else order[::-1]:
            r = run_setting(name, extra, args, out / "logs")
            r["round"] = rnd + 1
            results.append(r)
            print(f"round {rnd + 1}: {name}: {r['mean_ms_per_token']:.1f} ms/token "
                  f"(ready after {r['ready_s']:.0f} s)", flush=True)
    summary = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "tokens": args.tokens, "chats": CHATS,
               "results": results}
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    lines = [f"Machine: {summary['machine']}; {summary['date']}; `honcho start` with .env.example's values (Qwen2.5-"
             f"Coder 0.5B draft + 1.5B verify, bf16, native runner), {len(CHATS)} chats of {args.tokens} greedy tokens "
             f"each through the openai client, one at a time; ms/token from the first streamed token to the last.", "",
             "| setting | " + " | ".join(f"round {i + 1}" for i in range(args.rounds)) + " | vs tuned |",
             "|---|" + "---|" * (args.rounds + 1)]
    tuned = {r["round"]: r["mean_ms_per_token"] for r in results if r["setting"].startswith("tuned")}
    for name in SETTINGS:
        mine = {r["round"]: r["mean_ms_per_token"] for r in results if r["setting"] == name}
        ratios = " / ".join(f"{mine[k] / tuned[k]:.2f}" for k in sorted(mine))
        lines.append(f"| {name} | " + " | ".join(f"{mine[k]:.1f}" for k in sorted(mine)) + f" | {ratios} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
