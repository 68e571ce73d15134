"""`amusd-mq bench --concurrency 1,4,16,64`: the services under load, speculating or not.

For each concurrency C, C closed-loop clients each send a request, stream it, and send the next when it
ends, until the level has served its requests (prompts taken in turn). Two deployments on the same runner
and models take turns level by level: `ar` (the verifier alone: plain batched decoding) and `async` (with a
draft). Reported per level: throughput (tokens/s over the level's wall time), time to first token and
inter-token latency, p50 and p99. A chunk of n tokens after a gap g counts as n inter-token latencies of g/n,
so speculation's bursts are neither hidden nor rewarded. Every output is compared with the same prompt's
output under `ar` at concurrency 1.
"""
from __future__ import annotations

import asyncio
import json
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from .. import config as c
from ..cli.launch import Deployment, service_env
from ..frontend.client import AsyncClient
from .run import machine

STRATEGIES = {"ar": (c.COORDINATOR, c.VERIFY), "async": (c.COORDINATOR, c.VERIFY, c.DRAFT)}


@dataclass
class Level:
    strategy: str
    concurrency: int
    requests: int = 0
    tokens: int = 0
    wall_s: float = 0.0
    ttft_s: list[float] = field(default_factory=list)
    itl_s: list[float] = field(default_factory=list)
    verify_batch: list[float] = field(default_factory=list)
    proposed: int = 0
    accepted: int = 0
    outputs: dict[int, list[int]] = field(default_factory=dict)  # prompt index -> its output

    def row(self) -> dict:
        return {"strategy": self.strategy, "concurrency": self.concurrency, "requests": self.requests,
                "tokens": self.tokens, "wall_s": self.wall_s, "tokens_per_s": self.tokens / self.wall_s,
                "ttft_p50_ms": _pct(self.ttft_s, 50), "ttft_p99_ms": _pct(self.ttft_s, 99),
                "itl_p50_ms": _pct(self.itl_s, 50), "itl_p99_ms": _pct(self.itl_s, 99),
                "verify_batch": statistics.mean(self.verify_batch),
                "acceptance": self.accepted / self.proposed if self.proposed else 0.0}


def _pct(samples: list[float], q: int) -> float:
    ordered = sorted(samples)
    return 1000 * ordered[min(len(ordered) - 1, int(len(ordered) * q / 100))] if ordered else 0.0


async def closed_loop(url: str, prompts: list[list[int]], max_new: int, concurrency: int, requests: int,
                      strategy: str) -> Level:
    level = Level(strategy, concurrency)
    order = iter(range(requests))

    async def client_loop(client: AsyncClient):
        for n in order:
            index = n % len(prompts)
            sent = time.perf_counter()
            last = None
            async with client.stream(prompt_ids=prompts[index], max_new_tokens=max_new, ignore_eos=True) as stream:
                async for chunk in stream:
                    now = time.perf_counter()
                    if last is None:
                        level.ttft_s.append(now - sent)
                    else:
                        level.itl_s += [(now - last) / len(chunk.token_ids)] * len(chunk.token_ids)
                    last = now
            stats = stream.result.stats
            level.requests += 1
            level.tokens += len(stream.result.token_ids)
            level.verify_batch.append(stats["verify_batch"])
            level.proposed += stats["proposed"]
            level.accepted += stats["accepted"]
            level.outputs.setdefault(index, stream.result.token_ids)

    async with AsyncClient(url, timeout_s=600) as client:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        level.wall_s = time.perf_counter() - start
    return level


def run_load(cfg: c.Config, prompts: list[list[int]], max_new: int, concurrencies: list[int], requests: int | None,
             out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    levels: list[Level] = []
    with tempfile.TemporaryDirectory(prefix="amusd-load-") as tmp:
        deployments = {s: Deployment({**service_env(cfg, f"ipc://{tmp}/{s}"), "AMUSD_LOG_LEVEL": "INFO"},
                                     out / "logs" / s, roles) for s, roles in STRATEGIES.items()}
        try:
            for d in deployments.values():
                asyncio.run(d.wait_ready(drafts=int(c.DRAFT in d.procs)))
                asyncio.run(closed_loop(d.url, prompts[:1], max_new, 1, 1, "warm-up"))
            bar = tqdm(total=len(concurrencies) * len(STRATEGIES), desc="load", unit="level")
            for concurrency in concurrencies:
                n = requests or max(4 * concurrency, len(prompts))
                for strategy, d in deployments.items():
                    levels.append(asyncio.run(closed_loop(d.url, prompts, max_new, concurrency, n, strategy)))
                    bar.update(1)
            bar.close()
        finally:
            for d in deployments.values():
                d.stop()
    reference = next(lv for lv in levels if lv.strategy == "ar").outputs
    rows = []
    for lv in levels:
        row = lv.row()
        ar = next(r for r in rows if r["strategy"] == "ar" and r["concurrency"] == lv.concurrency) \
            if lv.strategy != "ar" else row
        row["vs_ar"] = row["tokens_per_s"] / ar["tokens_per_s"]
        row["identical"] = f"{sum(reference.get(i) == ids for i, ids in lv.outputs.items())}/{len(lv.outputs)}"
        rows.append(row)
    summary = {"machine": machine(cfg), "runner": cfg.runner, "draft_model": cfg.draft_model,
               "verify_model": cfg.verify_model, "dtype": cfg.dtype, "max_batch": cfg.max_batch,
               "lookahead": cfg.lookahead, "max_new_tokens": max_new, "prompts": len(prompts), "table": rows,
               "levels": [asdict(lv) | {"ttft_s": None, "itl_s": None, "outputs": None} for lv in levels],
               # What the speculating verifier measured and decided: its cost line and each switch on or off.
               "verifier": [line for line in (out / "logs" / "async" / "verify.log").read_text().splitlines()
                            if "verify pass costs" in line or "speculation o" in line]}
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    (out / "table.md").write_text(format_load_table(summary))
    plot_load(rows, out)
    return summary


def format_load_table(summary: dict) -> str:
    lines = ["| concurrency | strategy | requests | tokens/s | vs ar | TTFT p50 / p99 ms | ITL p50 / p99 ms | "
             "requests per verify pass | acceptance | identical |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary["table"]:
        lines.append(f"| {r['concurrency']} | {r['strategy']} | {r['requests']} | {r['tokens_per_s']:.1f} | "
                     f"{r['vs_ar']:.2f}x | {r['ttft_p50_ms']:.1f} / {r['ttft_p99_ms']:.1f} | "
                     f"{r['itl_p50_ms']:.2f} / {r['itl_p99_ms']:.2f} | {r['verify_batch']:.1f} | "
                     f"{r['acceptance']:.2f} | {r['identical']} |")
    cost, *switches = [line.split(" INFO ")[-1] for line in summary["verifier"]] or [""]
    if cost:
        lines += ["", f"The speculating verifier: {cost}; {len(switches)} switches"
                      + (f", the last ones: {'; '.join(switches[-4:])}" if switches else "")]
    return "\n".join(lines) + "\n"


def plot_load(rows: list[dict], out: Path) -> None:
    import matplotlib  # optional: the bench extra; only a run that plots needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for strategy in STRATEGIES:
        rs = [r for r in rows if r["strategy"] == strategy]
        x = [r["concurrency"] for r in rs]
        left.plot(x, [r["tokens_per_s"] for r in rs], marker="o", label=strategy)
        right.plot(x, [r["itl_p50_ms"] for r in rs], marker="o", label=f"{strategy} p50")
        right.plot(x, [r["itl_p99_ms"] for r in rs], marker="x", linestyle=":", label=f"{strategy} p99")
    left.set(xscale="log", xlabel="concurrent clients", ylabel="tokens/s", title="throughput")
    right.set(xscale="log", xlabel="concurrent clients", ylabel="ms", title="inter-token latency")
    left.legend()
    right.legend()
    fig.tight_layout()
    fig.savefig(out / "load.png", dpi=120)
    plt.close("all")
