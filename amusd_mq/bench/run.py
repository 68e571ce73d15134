"""`amusd-mq bench`: autoregressive vs synchronous vs asynchronous speculation, against the ideal and bounds.

Per prompt, strategies run back to back so drift hits all alike: `ar` and `sd` (gamma = each of
--gammas) in this process; through real sockets, `async` (our services: the verifier never waits) and
`amusd-policy` (the original's verifier: wait for 2 proposals, no lookahead cap). Timing boundary, identical for
all: from the commit of the first token to that of the last, per token (prefill excluded). The ideal of
each run is the discrete-event simulation of its schedule on the same trace and latency profile.
"""
from __future__ import annotations

import asyncio
import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import zmq
import zmq.asyncio
from tqdm import tqdm

from .. import config as c
from ..cli.launch import Deployment, service_env
from ..frontend.client import AsyncClient
from ..runtime.load import warm_for_role
from ..runtime.thread import ModelThread
from ..sampling import GREEDY, Sampling
from ..wire import protocol as p
from ..wire.codes import Policy
from ..wire.transport import make_socket, recv, send
from . import simulate
from .baselines import autoregressive, explain_difference, speculative_sync
from .trace import LatencyProfile, Trace, TracedPrompt, spend, trace_prompt

AMUSD_LOOKAHEAD = 64  # the original has no cap; this is the protocol's largest
SERVICE_STRATEGIES = {"async": Policy.EAGER, "amusd-policy": Policy.AMUSD}  # -> the verifier's policy
TIMINGS = ("verify_step_ms", "verify_gap_ms", "draft_step_ms", "restart_ms")


@dataclass
class Result:
    prompt: str
    strategy: str
    tokens: int
    ms_per_token: float
    identical: bool | None  # None in exact sampling mode, where only the distribution is the verify model's
    verify_steps: int = 0
    draft_steps: int = 0
    proposed: int = 0
    accepted: int = 0
    rollbacks: int = 0
    verify_busy: float = 1.0  # share of the decode time the verifier spent in forward passes
    verify_step_ms: float = 0.0  # the rest: services only, timed by the coordinator (Sequence.summary)
    verify_gap_ms: float = 0.0
    draft_step_ms: float = 0.0
    restart_ms: float = 0.0
    ideal_ms_per_token: float = 0.0
    ideal_tokens_per_step: float = 0.0
    difference: str = ""
    times: list[float] = field(default_factory=list)  # seconds since the first token, per token
    output: list[int] = field(default_factory=list)


def calibrate(lm, prompt_ids: list[int], extension: list[int], sizes=(1, 2, 4, 8, 16), repeats=5) -> dict[int, float]:
    """Median ms of a forward pass feeding n new tokens after a cached prefix, for each n."""
    session = lm.session()
    out = {}
    for n in sizes:
        samples = []
        for _ in range(repeats):
            session.greedy(prompt_ids, 1)  # leaves the cache at the prefix
            start = time.perf_counter()
            session.greedy(prompt_ids + extension[:n], 1)
            samples.append((time.perf_counter() - start) * 1000)
        out[n] = statistics.median(samples)
    return out


def profile_of(draft_lm, verify_lm, prompt: TracedPrompt) -> LatencyProfile:
    ext = prompt.target[:16]
    return LatencyProfile(calibrate(draft_lm, prompt.prompt_ids, ext, sizes=(1,))[1],
                          calibrate(verify_lm, prompt.prompt_ids, ext, sizes=tuple(n for n in (1, 2, 4, 8, 16)
                                                                                     if n <= len(ext))))


class Bench:
    def __init__(self, cfg: c.Config, backend: str, prompts: list[tuple[str, list[int]]] | None, trace: Trace | None,
                 max_new_tokens: int, gammas: list[int], lookahead: int, strategies: list[str], out: Path,
                 sampling: Sampling = GREEDY):
        self.cfg, self.backend, self.max_new, self.sampling = cfg, backend, max_new_tokens, sampling
        self.gammas, self.lookahead, self.strategies, self.out = gammas, lookahead, strategies, out
        self.trace = trace
        self.prompts = prompts or [(p.id, p.prompt_ids) for p in trace.prompts]
        self.results: list[Result] = []
        self.overheads: dict[str, float] = {}
        self.traced: dict[str, TracedPrompt] = {}

    def load_models(self):
        """The models `ar` and `sd` run on: the services' own, through the same runner."""
        self.draft = warm_for_role(self.cfg, c.DRAFT)
        self.verify = warm_for_role(self.cfg, c.VERIFY)

    def run(self) -> dict:
        self.load_models()
        self.out.mkdir(parents=True, exist_ok=True)
        per_prompt = 1 + len(self.gammas) * ("sd" in self.strategies) + sum(
            s in self.strategies for s in SERVICE_STRATEGIES)
        need_services = any(s in self.strategies for s in SERVICE_STRATEGIES)
        with tempfile.TemporaryDirectory(prefix="amusd-bench-") as tmp:
            env = {**service_env(self.cfg, f"ipc://{tmp}/c"), "AMUSD_LOG_LEVEL": "WARNING"}
            deployment = Deployment(env, self.out / "logs", roles=() if not need_services else
                                    (c.COORDINATOR, c.VERIFY, c.DRAFT))
            try:
                if need_services:
                    asyncio.run(deployment.wait_ready())
                    self.overheads = asyncio.run(measure_overheads(env["AMUSD_COORDINATOR_URL"],
                                                                   self.cfg.max_message_bytes))
                # Every strategy once before timing: CUDA graphs, allocators and the services' first request.
                self._prompt(*self.prompts[0], env["AMUSD_COORDINATOR_URL"], tqdm(disable=True), self.sampling)
                self.results.clear()
                self.traced.clear()
                bar = tqdm(total=len(self.prompts) * per_prompt, desc="bench", unit="run")
                for i, (pid, ids) in enumerate(self.prompts):
                    self._prompt(pid, ids, env["AMUSD_COORDINATOR_URL"], bar, replace(self.sampling,
                                                                                      seed=self.sampling.seed + i))
                bar.close()
            finally:
                deployment.stop()
        # The ideal of each run uses step times measured on the resources it ran on: all threads in this
        # process for ar and sd, the workers' share for the services.
        self.profiles = {"here": self._profile()}
        torch.set_num_threads(self.cfg.threads_of(c.VERIFY))
        self.profiles["workers"] = self._profile()
        for r in self.results:
            if self.sampling.mode == "exact":
                continue  # acceptance is a coin toss per token there: no trace fixes the schedule
            times = self._ideal(r)
            r.ideal_ms_per_token = simulate.ms_per_token(times)
            r.ideal_tokens_per_step = len(times) / len(set(times))  # a pass commits all its tokens at once
        return self.report()

    def _prompt(self, pid: str, ids: list[int], url: str, bar, sampling: Sampling) -> None:
        eos = self.verify.eos_token_ids
        ar = autoregressive(self.verify, ids, self.max_new, eos, sampling)
        self._add(pid, "ar", ar.token_ids, ar.times, ar.token_ids, verify_steps=ar.verify_steps)
        bar.update(1)
        self.traced[pid] = (next(p for p in self.trace.prompts if p.id == pid) if self.trace else
                            trace_prompt(self.draft, pid, ids, ar.token_ids, sampling))
        added = []
        if "sd" in self.strategies:
            for g in self.gammas:
                sd = speculative_sync(self.draft, self.verify, ids, self.max_new, eos, g, sampling)
                added.append(self._add(pid, f"sd-{g}", sd.token_ids, sd.times, ar.token_ids,
                                       verify_steps=sd.verify_steps, draft_steps=sd.draft_steps,
                                       proposed=sd.proposed, accepted=sd.accepted))
                bar.update(1)
        for strategy, policy in SERVICE_STRATEGIES.items():
            if strategy in self.strategies:
                out, times, stats = asyncio.run(_through_services(url, ids, self.max_new, self._lookahead(policy),
                                                                  policy, sampling))
                added.append(self._add(pid, strategy, out, times, ar.token_ids, **{
                    k: stats[k] for k in ("verify_steps", "draft_steps", "proposed", "accepted", "rollbacks",
                                          "verify_busy", *TIMINGS)}))
                bar.update(1)
        for result in added:
            if result.identical is False and hasattr(self.verify, "model"):
                result.difference = explain_difference(self.verify, ids, ar.token_ids, result.output, sampling)

    def _add(self, pid, strategy, ids, times, ar_ids, **counts) -> Result:
        t0 = times[0] if times else 0.0
        identical = ids == ar_ids if self.sampling.mode != "exact" else None
        result = Result(pid, strategy, len(ids), simulate.ms_per_token(times) * 1000, identical,
                        times=[t - t0 for t in times], output=ids, **counts)
        self.results.append(result)
        return result

    def _lookahead(self, policy: str) -> int:
        return AMUSD_LOOKAHEAD if policy == "amusd" else self.lookahead

    def _profile(self) -> LatencyProfile:
        if self.cfg.trace_compute.startswith("latency:") and self.backend == "trace":
            return LatencyProfile.load(self.cfg.trace_compute.split(":", 1)[1])
        return profile_of(self.draft, self.verify, next(iter(self.traced.values())))

    def _ideal(self, r: Result) -> list[float]:
        p = self.traced[r.prompt]
        lat = self.profiles["here" if r.strategy == "ar" or r.strategy.startswith("sd-") else "workers"]
        if r.strategy == "ar":
            times = simulate.autoregressive(p, lat)
        elif r.strategy.startswith("sd-"):
            times = simulate.synchronous(p, lat, int(r.strategy[3:]))
        else:
            policy = SERVICE_STRATEGIES[r.strategy]
            times = simulate.asynchronous(p, lat, self._lookahead(policy), policy)
        return times

    def report(self) -> dict:
        strategies = list(dict.fromkeys(r.strategy for r in self.results))
        mean = {s: statistics.mean(r.ms_per_token for r in self.results if r.strategy == s) for s in strategies}
        sd_names = [s for s in strategies if s.startswith("sd-")]
        best_sd = min(sd_names, key=mean.get) if sd_names else None
        rows = []
        for s in strategies:
            rs = [r for r in self.results if r.strategy == s]
            ideal = statistics.mean(r.ideal_ms_per_token for r in rs)
            rows.append({
                "strategy": s, "ms_per_token": mean[s], "speedup_vs_ar": mean["ar"] / mean[s],
                "speedup_vs_best_sd": mean[best_sd] / mean[s] if best_sd else None,
                "ideal_ms_per_token": ideal, "of_ideal": ideal / mean[s] if mean[s] else 0.0,
                "acceptance": _ratio(sum(r.accepted for r in rs), sum(r.proposed for r in rs)),
                "tokens_per_step": _ratio(sum(r.tokens for r in rs), sum(r.verify_steps for r in rs)),
                "ideal_tokens_per_step": statistics.mean(r.ideal_tokens_per_step for r in rs),
                "verify_busy": statistics.mean(r.verify_busy for r in rs),
                "rollbacks": sum(r.rollbacks for r in rs),
                "wasted_draft_tokens": sum(max(0, r.draft_steps - r.accepted) for r in rs if r.draft_steps),
                "identical": f"{sum(bool(r.identical) for r in rs)}/{len(rs)}" if self.sampling.mode != "exact"
                else "-",
                **{k: statistics.mean(getattr(r, k) for r in rs) for k in TIMINGS},
                "profile_verify_step_ms": self.profiles["workers"].verify(
                    1 + _ratio(sum(r.proposed for r in rs), sum(r.verify_steps for r in rs))),
            })
        alpha = statistics.mean(p.acceptance() for p in self.traced.values())
        workers = self.profiles["workers"]
        t_d, t_v = workers.draft_ms, workers.verify(1)
        summary = {
            "machine": machine(self.cfg), "backend": self.backend, "runner": self.verify.runner,
            "draft_model": self.cfg.draft_model, "verify_model": self.cfg.verify_model, "dtype": self.cfg.dtype,
            "trace_compute": self.cfg.trace_compute,
            "prompts": len(self.prompts), "max_new_tokens": self.max_new, "lookahead": self.lookahead,
            "sampling": asdict(self.sampling),
            "best_sd": best_sd, "profiles": {k: asdict(v) for k, v in self.profiles.items()}, "alpha": alpha,
            "c": t_d / t_v, "t_d_ms": t_d, "t_v_ms": t_v,
            "bounds": simulate.bounds(alpha, t_d / t_v, t_v, t_d), "table": rows, "overheads": self.overheads,
            "differences": [asdict(r) | {"times": None} for r in self.results if r.identical is False],
            "results": [asdict(r) for r in self.results],
        }
        (self.out / "results.json").write_text(json.dumps(summary, indent=1))
        text = format_table(summary)
        (self.out / "table.md").write_text(text)
        plot(self.results, strategies, rows, self.out)
        return summary


def _ratio(a, b) -> float:
    return a / b if b else 0.0


async def measure_overheads(url: str, max_bytes: int, n: int = 500) -> dict[str, float]:
    """The unit costs on this deployment, idle: one hop (half a ping round trip through the coordinator's event
    loop); msgpack encode+decode with validation of a typical proposal, verdict and commit; the event loop's
    round trip to the model thread and back with an empty job (paid once per forward pass); and how far the
    latency model's 3 ms step overshoots."""
    ctx = zmq.asyncio.Context()
    sock = make_socket(ctx, zmq.DEALER, max_bytes)
    sock.connect(url)
    try:
        rtts = []
        for _ in range(n):
            start = time.perf_counter()
            await send(sock, p.Ping())
            await recv(sock, max_bytes, routed=False)  # a pong
            rtts.append(time.perf_counter() - start)
    finally:
        sock.close()
        ctx.term()
    typical = [p.Propose(req_id="0" * 32, epoch=3, pos=100, token_ids=[1234]),
               p.Verdict(req_id="0" * 32, start=100, token_ids=[1, 2, 3], proposed=3, accepted=2, epoch=3,
                         lookahead=8, step_ms=10.0),
               p.Commit(seq=1000, req_id="0" * 32, epoch=3, start=100, token_ids=[1, 2, 3], done=False, lookahead=8)]
    rounds = []
    for _ in range(10):  # the fastest round: on a shared machine the others include time on another process
        start = time.perf_counter()
        for _ in range(n // 10):
            for msg in typical:
                p.decode(p.encode(msg), max_bytes)
        rounds.append((time.perf_counter() - start) / (n // 10 * len(typical)) * 1e6)
    codec_us = min(rounds)
    thread, handoffs, overshoots = ModelThread(1), [], []
    for _ in range(n):
        start = time.perf_counter()
        await thread.submit(int)
        handoffs.append(time.perf_counter() - start)
    for _ in range(n // 5):
        start = time.perf_counter()
        spend(0.003)
        overshoots.append(time.perf_counter() - start - 0.003)
    return {"hop_ms": statistics.median(rtts) / 2 * 1000, "codec_us": codec_us,
            "handoff_ms": statistics.median(handoffs) * 1000, "step_overshoot_ms": statistics.median(overshoots) * 1000}


async def _through_services(url, ids, max_new, lookahead, policy, sampling: Sampling):
    async with AsyncClient(url, timeout_s=120) as client:
        stream = client.stream(prompt_ids=ids, max_new_tokens=max_new, lookahead=lookahead, policy=policy,
                               temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
                               seed=sampling.seed, sampling_mode=sampling.mode)
        times = []
        async for chunk in stream:
            times += [time.perf_counter()] * len(chunk.token_ids)
    return stream.result.token_ids, times, stream.result.stats


def machine(cfg: c.Config) -> dict:
    info = {"platform": platform.platform(), "cpu": cpu_name(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d")}
    for role, device in (("draft", cfg.draft_device), ("verify", cfg.verify_device)):
        info[f"{role}_device"] = torch.cuda.get_device_name(device) if device.startswith("cuda") else info["cpu"]
    return info


def cpu_line() -> str:
    """The CPU, the cores this process may use, and the vector ISA that decides the kernels."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        flags = ""
    isa = [f for f in ("avx512f", "avx512_bf16", "amx_bf16", "avx2") if f" {f}" in flags]
    return f"{cpu_name()}, {len(os.sched_getaffinity(0))} cores, {'/'.join(isa) or 'no AVX'}"


def cpu_name() -> str:
    """The CPU's model name (platform.processor() is empty on most Linux systems)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def format_table(summary: dict) -> str:
    lines = [f"| strategy | ms/token | vs ar | vs {summary['best_sd'] or 'sd'} | ideal ms/token | of ideal | "
             "acceptance | tokens/step (ideal) | verifier busy | rollbacks | wasted draft | identical |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    exact = summary["sampling"]["mode"] == "exact"  # no trace fixes an exact-mode schedule, so no ideal
    for r in summary["table"]:
        vs_sd = f"{r['speedup_vs_best_sd']:.2f}x" if r["speedup_vs_best_sd"] else "-"
        ideal = ("-", "-", "-") if exact else (f"{r['ideal_ms_per_token']:.2f}", f"{r['of_ideal']:.2f}",
                                               f"{r['ideal_tokens_per_step']:.2f}")
        lines.append(f"| {r['strategy']} | {r['ms_per_token']:.2f} | {r['speedup_vs_ar']:.2f}x | {vs_sd} | "
                     f"{ideal[0]} | {ideal[1]} | {r['acceptance']:.2f} | {r['tokens_per_step']:.2f} ({ideal[2]}) | "
                     f"{r['verify_busy']:.2f} | {r['rollbacks']} | {r['wasted_draft_tokens']} | {r['identical']} |")
    b = summary["bounds"]
    lines.append("")
    alpha = "estimated by the seeded coupling, " if exact else ""
    lines.append(f"alpha (teacher-forced acceptance, {alpha}per token) {summary['alpha']:.3f}, "
                 f"c = t_d/t_v {summary['c']:.3f}; "
                 f"bounds vs ar: best sync SD {b['sync_best']:.2f}x (gamma {b['sync_best_gamma']}), "
                 f"async with enough verifiers {b['async_dsi']:.2f}x, two devices {b['two_device']:.2f}x")
    services = [r for r in summary["table"] if r["strategy"] in SERVICE_STRATEGIES]
    if services:
        o = summary["overheads"]
        lines += ["", f"Where the services' time goes (mean per event, on the coordinator's clock; profile: "
                      f"t_d {summary['t_d_ms']:.2f} ms, t_v(1) {summary['t_v_ms']:.2f} ms; one hop "
                      f"{o['hop_ms']:.3f} ms, encode+decode {o['codec_us']:.1f} us per message, event loop to model "
                      f"thread and back {o['handoff_ms']:.3f} ms per pass, an emulated 3 ms step overshoots by "
                      f"{o['step_overshoot_ms']:.3f} ms):", "",
                  "| strategy | verify pass ms (profile) | verifier turnaround ms | draft step ms | "
                  "restart after rollback ms |", "|---|---|---|---|---|"]
        lines += [f"| {r['strategy']} | {r['verify_step_ms']:.2f} ({r['profile_verify_step_ms']:.2f}) | "
                  f"{r['verify_gap_ms']:.2f} | "
                  f"{r['draft_step_ms']:.2f} | {r['restart_ms']:.2f} |" for r in services]
    return "\n".join(lines) + "\n"


def plot(results: list[Result], strategies: list[str], rows: list[dict], out: Path) -> None:
    import matplotlib  # optional: the bench extra; only a run that plots needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = results[0].prompt
    fig, ax = plt.subplots(figsize=(7, 4))
    for s in strategies:
        r = next(r for r in results if r.prompt == first and r.strategy == s)
        ax.step([t * 1000 for t in r.times], range(1, len(r.times) + 1), where="post", label=s)
    ax.set(xlabel="ms since the first token", ylabel="tokens committed", title=f"token progress, {first}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "progress.png", dpi=120)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar([r["strategy"] for r in rows], [r["speedup_vs_ar"] for r in rows], label="measured")
    ax.scatter([r["strategy"] for r in rows], [r["speedup_vs_ar"] / r["of_ideal"] if r["of_ideal"] else 0
                                               for r in rows], color="black", marker="_", s=400, label="ideal")
    ax.set(ylabel="speedup vs ar", title="mean ms/token relative to ar")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "speedup.png", dpi=120)
    plt.close("all")
