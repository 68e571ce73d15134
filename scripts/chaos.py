"""Chaos soak: N requests against a deployment of separate processes while services are killed and frozen.

Starts a coordinator, two verifiers and two drafts (tiny fp32 models by default), runs requests two at a
time, and for a share of them SIGKILLs (then restarts) or SIGSTOPs (then resumes) a random worker, or with
--coordinator also the coordinator, at a random moment mid-generation. With --message-faults P every
message between services is dropped, duplicated or held back with probability P each. A request whose
coordinator restarted is submitted again (Lazy Pirate). Every output is checked against the verify model's
own greedy decoding.

    python scripts/chaos.py --requests 200 --fault-rate 0.5 --coordinator --message-faults 0.02
"""
from __future__ import annotations

import argparse
import ast
import asyncio
import json
import random
import re
import signal
import statistics
import sys
import tempfile
import time

from amusd_mq import AmusdError, AsyncClient, CoordinatorUnavailableError, NoWorkerError, RequestFailedError
from amusd_mq.backend import CausalLM
from amusd_mq.baselines import autoregressive
from amusd_mq.launch import Deployment

WORKERS = ("verify", "verify-b", "draft", "draft-b")
RESUBMISSIONS = 60  # a request whose coordinator restarted is submitted again every 0.5 s, this many times at most


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--fault-rate", type=float, default=0.5)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--verify-delay-ms", type=float, default=15.0, help="make the tiny verifier as slow as a big one")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--coordinator", action="store_true", help="kill and restart the coordinator too")
    ap.add_argument("--message-faults", type=float, default=0.0, help="drop/dup/delay probability, each")
    ap.add_argument("--out", help="write the figures as JSON here")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    tmp = tempfile.mkdtemp(prefix="amusd-chaos-")
    env = {"AMUSD_COORDINATOR_URL": f"ipc://{tmp}/c", "AMUSD_DRAFT_MODEL": "tiny-draft",
           "AMUSD_VERIFY_MODEL": "tiny-verify", "AMUSD_DTYPE": "float32", "AMUSD_THREADS": "1",
           "AMUSD_HEARTBEAT_S": "0.25", "AMUSD_FAILOVER_S": "10", "AMUSD_LOG_LEVEL": "WARNING",
           "AMUSD_VERIFY_DELAY_MS": str(args.verify_delay_ms), "AMUSD_PROGRESS_TIMEOUT_S": "2",
           **({f"AMUSD_FAULT_{k}": str(args.message_faults) for k in ("DROP", "DUP", "DELAY")}
              if args.message_faults else {})}
    verify = CausalLM("tiny-verify", "cpu", "float32")
    d = Deployment(env, f"{tmp}/logs", roles=("coordinator", "verify", "draft"))
    d.start("verify", name="verify-b")
    d.start("draft", name="draft-b")
    await d.wait_ready(verifiers=2, drafts=2, timeout_s=300)
    role = {"verify": "verify", "verify-b": "verify", "draft": "draft", "draft-b": "draft",
            "coordinator": "coordinator"}
    targets = WORKERS + ("coordinator",) * args.coordinator
    figures = {"completed": 0, "failed_with_committed_prefix": 0, "errors": 0, "lost": 0, "duplicated": 0,
               "differing": 0, "faults": 0, "resubmitted": 0, "recovery_s": []}

    busy: set[str] = set()  # one fault per service at a time: two restarts would leave two processes

    async def inject(name: str, delay: float) -> None:
        await asyncio.sleep(delay)
        if name in busy:
            return
        busy.add(name)
        try:
            await strike(name)
        finally:
            busy.discard(name)

    async def strike(name: str) -> None:
        proc = d.procs[name]
        figures["faults"] += 1
        if name == "coordinator" or rng.random() < 0.5:
            proc.kill()
            proc.wait()
            await asyncio.sleep(0.5)
            d.start(role[name], name=name)  # a replacement, as a supervisor would start
        else:
            proc.send_signal(signal.SIGSTOP)
            await asyncio.sleep(2.0)
            proc.send_signal(signal.SIGCONT)

    async def one(client: AsyncClient, i: int) -> None:
        prompt_ids = [rng.randrange(256) for _ in range(rng.randrange(3, 12))]
        expected = autoregressive(verify, prompt_ids, args.max_new_tokens, verify.eos_token_ids).token_ids
        fault = asyncio.create_task(inject(rng.choice(targets), rng.uniform(0.05, 0.4))) \
            if rng.random() < args.fault_rate else None
        streamed, times = [], [time.monotonic()]
        try:
            for attempt in range(RESUBMISSIONS + 1):
                try:
                    async for chunk in client.stream(prompt_ids=prompt_ids, max_new_tokens=args.max_new_tokens):
                        streamed += chunk.token_ids
                        times.append(time.monotonic())
                    break
                except (CoordinatorUnavailableError, NoWorkerError):
                    if streamed != expected[:len(streamed)] or attempt == RESUBMISSIONS:
                        raise
                    # What arrived was right; ask the new coordinator again, once its workers are back.
                    figures["resubmitted"] += 1
                    streamed = []
                    await asyncio.sleep(0.5)
            figures["completed"] += 1
            committed = expected  # a completed request owes every token
        except RequestFailedError as exc:
            figures["failed_with_committed_prefix"] += exc.token_ids == expected[:len(exc.token_ids)]
            committed = exc.token_ids
        except AmusdError as exc:  # the client's own order check: a repeated or skipped position
            figures["duplicated" if "out of order" in str(exc) else "errors"] += 1
            committed = streamed
        figures["lost"] += max(0, len(committed) - len(streamed))
        figures["differing"] += streamed != expected[:len(streamed)]
        if fault is not None:
            figures["recovery_s"].append(max(b - a for a, b in zip(times, times[1:])) if len(times) > 1 else 0.0)
            await fault

    async with AsyncClient(d.url, timeout_s=10) as client:
        started = time.monotonic()
        for i in range(0, args.requests, 2):
            await asyncio.gather(*(one(client, j) for j in range(i, min(i + 2, args.requests))))
            print(f"\r{min(i + 2, args.requests)}/{args.requests} requests", end="", file=sys.stderr, flush=True)
        elapsed = time.monotonic() - started
        status = await client.status()
    print(file=sys.stderr)
    d.stop()
    for log in d.log_dir.glob("*.log"):  # each service reports the faults it injected when it stops
        for found in re.findall(r"message faults injected: (\{.*\})", log.read_text(errors="replace")):
            for kind, n in ast.literal_eval(found).items():
                figures[f"messages_{kind}"] = figures.get(f"messages_{kind}", 0) + n
    recovery = sorted(figures.pop("recovery_s"))
    figures.update(requests=args.requests, elapsed_s=round(elapsed, 1), rejected=status.rejected,
                   recovery_p50_s=round(statistics.median(recovery), 3) if recovery else 0.0,
                   recovery_p99_s=round(recovery[min(len(recovery) - 1, int(0.99 * len(recovery)))], 3)
                   if recovery else 0.0)
    for key, value in figures.items():
        print(f"{key:<30} {value}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(figures, f, indent=1)
    return 0 if figures["differing"] == figures["duplicated"] == figures["lost"] == 0 else 1


if __name__ == "__main__":
    try:
        sys.exit(asyncio.run(main()))
    except AmusdError as exc:
        sys.exit(f"chaos: {exc}")
