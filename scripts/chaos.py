"""Chaos soak: N requests against a deployment of separate processes while services are killed and frozen.

Starts a coordinator, two verifiers and two drafts (tiny fp32 models by default), runs requests from
--clients concurrent clients (each its own connection, sending its next request when the last ends, so the
workers serve batches), and for a share of them SIGKILLs (then restarts) or SIGSTOPs (then resumes) a random
worker, or with --coordinator also the coordinator, at a random moment mid-generation. With --message-faults P every
message between services is dropped, duplicated or held back with probability P each. A request whose
coordinator restarted is submitted again (Lazy Pirate). Every output is checked against the verify model's
own greedy decoding. With --hostile, careless and hostile peers act beside the soak, one after another: poison
frames, a 3 MiB prompt, a client killed or closed mid-stream, one client's flood, and with --coordinator three
coordinator restarts in a row with a wrong-vocabulary worker waiting to register first. Each is timed against what
the service promises.

    python scripts/chaos.py --requests 200 --clients 8 --fault-rate 0.5 --coordinator --message-faults 0.02 --hostile
"""
from __future__ import annotations

import argparse
import ast
import asyncio
import itertools
import json
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import msgpack
import zmq
import zmq.asyncio

from amusd_mq import (
    AmusdError,
    AsyncClient,
    CoordinatorUnavailableError,
    InvalidRequestError,
    NoWorkerError,
    OverloadedError,
    RequestFailedError,
    models,
)
from amusd_mq.bench.baselines import autoregressive
from amusd_mq.cli.launch import Deployment
from amusd_mq.runtime.load import load
from amusd_mq.wire import protocol as p
from amusd_mq.wire.transport import recv

WORKERS = ("verify", "verify-b", "draft", "draft-b")
RESUBMISSIONS = 60  # a request whose coordinator restarted is submitted again every 0.5 s, this many times at most
FLOOD, FLOOD_LIMIT = 300, 32  # requests one client floods with, and how many it may have in flight
POISON = [msgpack.packb(body) for body in (
    {"v": p.PROTOCOL_VERSION, "t": [1]}, {"v": p.PROTOCOL_VERSION, "t": "hello", b"x": 1}, {"v": True, "t": "hello"},
    {"v": p.PROTOCOL_VERSION, "t": "hello", "x": msgpack.ExtType(7, b"")}, {1: 2}, [{"v": 2**64 - 1}],
)] + [b"\x91" * 100_000 + b"\x00", b"\xc1"]
KILLED_CLIENT = """
import asyncio, sys
from amusd_mq import AsyncClient
async def main():
    async with AsyncClient(sys.argv[1], timeout_s=30) as client:
        async for chunk in client.stream(prompt_ids=[1, 2, 3], max_new_tokens=2000, ignore_eos=True):
            print(len(chunk.token_ids), flush=True)
asyncio.run(main())
"""


class Hostile:
    """Careless and hostile peers beside the soak, one event every two seconds until it ends."""

    def __init__(self, d: Deployment, busy: set[str], window_s: float):
        self.d = d
        self.busy = busy  # the services taking a fault now, shared with the soak's strikes
        self.window_s = window_s
        self.figures: dict[str, list] = defaultdict(list)
        self.odd_model = str(Path(d.log_dir).parent / "odd-draft")
        shutil.copytree(models.resolve("tiny-draft"), self.odd_model)
        tokenizer = json.loads(Path(self.odd_model, "tokenizer.json").read_text())
        tokenizer["model"]["vocab"]["<odd>"] = len(tokenizer["model"]["vocab"])  # another vocabulary
        Path(self.odd_model, "tokenizer.json").write_text(json.dumps(tokenizer))

    async def run(self, restarts: bool) -> None:
        events = [self.poison, self.big_prompt, self.killed_client, self.closed_client, self.flood]
        events += [self.restarts] * restarts
        for event in itertools.cycle(events):
            await asyncio.sleep(2.0)
            if "coordinator" in self.busy:
                continue
            try:
                await event()
            except AmusdError:
                self.figures["events_spoiled_by_a_strike"].append(1)  # e.g. the coordinator restarted meanwhile

    async def status(self) -> tuple[str, p.StatusReply] | None:
        """The coordinator's run and its counters, or None when it doesn't answer."""
        try:
            async with AsyncClient(self.d.url, timeout_s=2.0) as client:
                return client.welcome.instance, await client.status()
        except AmusdError:
            return None

    async def poison(self) -> None:
        """Every poison frame is answered with an error, and a hello after them within a second."""
        ctx = zmq.asyncio.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.connect(self.d.url)

        async def ask(frame: bytes) -> p.Message:
            await sock.send(frame)
            return (await asyncio.wait_for(recv(sock, 1 << 20, routed=False), 5.0))[1][0]

        try:
            replies = [await ask(frame) for frame in POISON]
            start = time.monotonic()
            await ask(p.encode(p.Hello(req_id="h")))
            self.figures["hello_after_poison_s"].append(time.monotonic() - start)
            self.figures["poison_frames_refused"].append(sum(isinstance(r, p.Error) for r in replies))
        except asyncio.TimeoutError:
            if "coordinator" not in self.busy:  # not a strike of the soak's: the coordinator went deaf
                self.figures["poison_unanswered"].append(1)
        finally:
            sock.close()
            ctx.term()

    async def big_prompt(self) -> None:
        """A 3 MiB prompt is refused before it is tokenized."""
        async with AsyncClient(self.d.url, timeout_s=10) as client:
            start = time.monotonic()
            try:
                await client.generate("x" * (3 << 20), max_new_tokens=4)
            except InvalidRequestError:
                self.figures["big_prompt_refused_s"].append(time.monotonic() - start)

    async def killed_client(self) -> None:
        """A client SIGKILLed mid-stream: the coordinator frees its request within the liveness window."""
        proc = subprocess.Popen([sys.executable, "-c", KILLED_CLIENT, self.d.url], stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL)

        async def streaming() -> bool:
            return bool(await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 30))  # not failed

        async def kill() -> None:
            proc.kill()

        try:
            await self.time_until_cancelled("killed_client_freed_s", streaming, kill)
        finally:
            proc.kill()
            proc.wait()

    async def closed_client(self) -> None:
        """A client closed mid-stream: its cancel frees the request at once."""
        client = AsyncClient(self.d.url, timeout_s=10)
        await client.connect()

        stream = client.stream(prompt_ids=[1, 2, 3], max_new_tokens=2000, ignore_eos=True)  # held: not collected

        async def streaming() -> bool:
            await stream.__anext__()
            return True

        try:
            await self.time_until_cancelled("closed_client_freed_s", streaming, client.close)
        finally:
            await client.close()

    async def time_until_cancelled(self, figure: str, streaming, abandon) -> None:
        """Abandon a running request and time it until the coordinator counts it cancelled. A coordinator
        restarted meanwhile spoils the measurement."""
        before = await self.status()
        if before is None or not await streaming():
            return
        await abandon()
        abandoned = time.monotonic()
        while time.monotonic() - abandoned < 10 * self.window_s:
            now = await self.status()
            if now is None or now[0] != before[0]:
                return
            if now[1].cancelled > before[1].cancelled:
                self.figures[figure].append(time.monotonic() - abandoned)
                return
            await asyncio.sleep(0.05)
        self.figures[figure.removesuffix("_s") + "_never"].append(1)

    async def flood(self) -> None:
        """One client sends FLOOD requests at once: all but FLOOD_LIMIT are refused, and close() cancels those."""
        async with AsyncClient(self.d.url, timeout_s=10) as client:
            tasks = [asyncio.create_task(client.generate(prompt_ids=[1, 2, 3], max_new_tokens=8))
                     for _ in range(FLOOD)]
            await asyncio.wait(tasks, timeout=1.0)
        results = await asyncio.gather(*tasks, return_exceptions=True)
        self.figures["flood_refused"].append(sum(isinstance(r, OverloadedError) for r in results))

    async def restarts(self) -> None:
        """Three coordinator restarts in a row, a wrong-vocabulary worker waiting to register before the first. The
        soak strikes no service meanwhile, so the time measured is the workers' coming back, not a restarted one's
        loading its model."""
        while self.busy:
            await asyncio.sleep(0.1)
        self.busy.update(self.d.procs)
        try:
            for i in range(3):
                old = self.d.procs.pop("coordinator")
                old.kill()
                old.wait()
                odd = self.d.start("draft", name="odd-draft", AMUSD_DRAFT_MODEL=self.odd_model) if i == 0 else None
                if odd is not None:
                    await asyncio.sleep(4.0)  # loaded, and its registration queued for the next coordinator
                self.d.start("coordinator")
                up = await self.welcome_when(lambda w: True)
                back = await self.welcome_when(lambda w: w.verifiers >= 2 and w.drafts >= 2)
                self.figures["workers_back_after_restart_s"].append(back - up)
                if odd is not None:
                    self.figures["wrong_vocabulary_exit_code"].append(await asyncio.to_thread(odd.wait, 60))
                    self.d.procs.pop("odd-draft")
        finally:
            self.busy.clear()

    async def welcome_when(self, ready) -> float:
        while True:
            try:
                async with AsyncClient(self.d.url, timeout_s=0.3) as client:
                    if ready(client.welcome):
                        return time.monotonic()
            except CoordinatorUnavailableError:
                pass
            await asyncio.sleep(0.05)

    def summary(self) -> dict:
        out = {}
        for key, values in self.figures.items():
            if key.endswith("_s"):
                out[f"{key}_max"] = round(max(values), 3)
                out[f"{key}_n"] = len(values)
            elif key.endswith("_code"):
                out[key] = sorted(set(values))
            else:
                out[key] = sum(values)
        return out


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--clients", type=int, default=2, help="concurrent clients, each with its own connection")
    ap.add_argument("--fault-rate", type=float, default=0.5)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--verify-delay-ms", type=float, default=15.0, help="make the tiny verifier as slow as a big one")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--coordinator", action="store_true", help="kill and restart the coordinator too")
    ap.add_argument("--message-faults", type=float, default=0.0, help="drop/dup/delay probability, each")
    ap.add_argument("--hostile", action="store_true", help="poison frames, killed clients, floods and (with "
                    "--coordinator) restarts in a row with a wrong-vocabulary worker, beside the soak")
    ap.add_argument("--out", help="write the figures as JSON here")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    tmp = tempfile.mkdtemp(prefix="amusd-chaos-")
    env = {"AMUSD_COORDINATOR_URL": f"ipc://{tmp}/c", "AMUSD_DRAFT_MODEL": "tiny-draft",
           "AMUSD_VERIFY_MODEL": "tiny-verify", "AMUSD_DTYPE": "float32", "AMUSD_THREADS": "1",
           "AMUSD_HEARTBEAT_S": "0.25", "AMUSD_FAILOVER_S": "10", "AMUSD_LOG_LEVEL": "WARNING",
           "AMUSD_VERIFY_DELAY_MS": str(args.verify_delay_ms), "AMUSD_PROGRESS_TIMEOUT_S": "2",
           "AMUSD_MAX_CLIENT_REQUESTS": str(FLOOD_LIMIT),
           **({f"AMUSD_FAULT_{k}": str(args.message_faults) for k in ("DROP", "DUP", "DELAY")}
              if args.message_faults else {})}
    verify = load("tiny-verify", "cpu", "float32")
    reference_thread = ThreadPoolExecutor(1)  # the reference decodes one at a time, beside the clients' event loop
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
        # Off the event loop: a client that blocks it misses its pings, and the coordinator cancels its requests.
        expected = (await asyncio.get_running_loop().run_in_executor(
            reference_thread, autoregressive, verify, prompt_ids, args.max_new_tokens, verify.eos_token_ids)).token_ids
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

    hostile = Hostile(d, busy, window_s=0.25 * 5) if args.hostile else None
    adversary = asyncio.create_task(hostile.run(args.coordinator)) if hostile else None
    order, finished = iter(range(args.requests)), itertools.count(1)

    async def client_loop() -> None:
        async with AsyncClient(d.url, timeout_s=10) as client:
            for i in order:
                await one(client, i)
                print(f"\r{next(finished)}/{args.requests} requests", end="", file=sys.stderr, flush=True)

    started = time.monotonic()
    await asyncio.gather(*(client_loop() for _ in range(args.clients)))
    elapsed = time.monotonic() - started
    async with AsyncClient(d.url, timeout_s=10) as client:
        if adversary is not None:
            adversary.cancel()
            await asyncio.gather(adversary, return_exceptions=True)
        status = await client.status()
    print(file=sys.stderr)
    d.stop()
    for log in d.log_dir.glob("*.log"):  # each service reports the faults it injected when it stops
        for found in re.findall(r"message faults injected: (\{.*\})", log.read_text(errors="replace")):
            for kind, n in ast.literal_eval(found).items():
                figures[f"messages_{kind}"] = figures.get(f"messages_{kind}", 0) + n
    recovery = sorted(figures.pop("recovery_s"))
    figures.update(requests=args.requests, clients=args.clients, elapsed_s=round(elapsed, 1), rejected=status.rejected,
                   recovery_p50_s=round(statistics.median(recovery), 3) if recovery else 0.0,
                   recovery_p99_s=round(recovery[min(len(recovery) - 1, int(0.99 * len(recovery)))], 3)
                   if recovery else 0.0, **(hostile.summary() if hostile else {}))
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
