"""A client in a process of its own, for tests that run it inside a network namespace or kill it mid-stream: wait
until a verifier and a draft have registered, stream one generation, and print JSON lines: {"t", "ids"} per chunk,
then {"done"} or {"error", "message"}. CURVE keys, if any, come from the AMUSD_CURVE_* environment."""
import argparse
import asyncio
import json
import time

from amusd_mq import AmusdError, AsyncClient


def emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


async def main(url: str, prompt: str, max_new_tokens: int, ready_s: float, ignore_eos: bool) -> None:
    deadline = time.monotonic() + ready_s
    while True:
        try:
            async with AsyncClient(url, timeout_s=1.0) as client:
                if client.welcome.verifiers and client.welcome.drafts:
                    break
                error = {"error": "NotReady", "message": str(client.welcome)}
        except AmusdError as exc:
            error = {"error": type(exc).__name__, "message": str(exc)}
        if time.monotonic() > deadline:
            return emit(**error)
        await asyncio.sleep(0.2)
    try:
        async with AsyncClient(url, timeout_s=30) as client:
            stream = client.stream(prompt, max_new_tokens=max_new_tokens, ignore_eos=ignore_eos)
            async for chunk in stream:
                emit(t=time.monotonic(), ids=chunk.token_ids)
    except AmusdError as exc:
        return emit(error=type(exc).__name__, message=str(exc))
    emit(done=stream.result.finish_reason)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("prompt")
    parser.add_argument("max_new_tokens", type=int)
    parser.add_argument("--ready-s", type=float, default=120)
    parser.add_argument("--ignore-eos", action="store_true")
    args = parser.parse_args()
    asyncio.run(main(args.url, args.prompt, args.max_new_tokens, args.ready_s, args.ignore_eos))
