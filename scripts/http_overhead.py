"""What the HTTP gateway costs: the same closed-loop load through the Python client and through the official
`openai` client via the gateway, against one deployment. Prints tokens/s and mean time to first token.

    python scripts/http_overhead.py [--concurrency 1,16] [--requests 64] [--max-tokens 64]

Tiny fp32 models by default (any AMUSD_* setting applies), so that the per-request costs around the models show.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import socket
import tempfile
import time
import urllib.request

import openai

from amusd_mq import AsyncClient
from amusd_mq.bench.run import cpu_name
from amusd_mq.cli.launch import Deployment

PROMPT = "def fib(n):"


async def closed_loop(concurrency: int, requests: int, one) -> tuple[float, float, int]:
    """(seconds, mean TTFT, tokens) for `requests` requests, `concurrency` at a time."""
    queue = list(range(requests))
    ttfts, tokens = [], 0

    async def worker():
        nonlocal tokens
        while queue:
            queue.pop()
            ttft, n = await one()
            ttfts.append(ttft)
            tokens += n

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - start, sum(ttfts) / len(ttfts), tokens


async def main(args) -> None:
    port = _free_port()
    sock_dir = tempfile.mkdtemp(prefix="amh-")
    env = {"AMUSD_COORDINATOR_URL": f"ipc://{sock_dir}/c", "AMUSD_HTTP_PORT": str(port),
           "AMUSD_DRAFT_MODEL": "tiny-draft", "AMUSD_VERIFY_MODEL": "tiny-verify", "AMUSD_DTYPE": "float32",
           "AMUSD_THREADS": "1", **{k: v for k, v in os.environ.items() if k.startswith("AMUSD_")}}
    model = env["AMUSD_VERIFY_MODEL"]
    with Deployment(env, f"{sock_dir}/logs", ("coordinator", "verify", "draft", "gateway")) as d:
        await d.wait_ready()
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
                break
            except OSError:
                await asyncio.sleep(0.2)
        http = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        async with AsyncClient(d.url, timeout_s=60) as client:

            async def direct():
                start, first, n = time.perf_counter(), None, 0
                async for chunk in client.stream(PROMPT, max_new_tokens=args.max_tokens, ignore_eos=True):
                    first = first or time.perf_counter() - start
                    n += len(chunk.token_ids)
                return first, n

            async def via_http():
                start, first, n = time.perf_counter(), None, 0
                stream = await http.completions.create(model=model, prompt=PROMPT, max_tokens=args.max_tokens,
                                                       temperature=0, stream=True, extra_body={"ignore_eos": True},
                                                       stream_options={"include_usage": True})
                async for chunk in stream:
                    if chunk.choices and chunk.choices[0].text:
                        first = first or time.perf_counter() - start
                    if chunk.usage:
                        n = chunk.usage.completion_tokens
                return first, n

            await closed_loop(4, 8, direct)  # warm both paths
            await closed_loop(4, 8, via_http)
            print(f"# {cpu_name()}, {os.cpu_count()} cores; {model}, "
                  f"{args.requests} requests of {args.max_tokens} tokens per level")
            print("| concurrency | path | tokens/s | mean TTFT ms |")
            print("|---|---|---|---|")
            for c in args.concurrency:
                for name, one in (("AsyncClient", direct), ("HTTP (openai)", via_http)):
                    seconds, ttft, tokens = await closed_loop(c, args.requests, one)
                    print(f"| {c} | {name} | {tokens / seconds:.0f} | {1000 * ttft:.1f} |", flush=True)
        await http.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    asyncio.run(main(parser.parse_args()))
