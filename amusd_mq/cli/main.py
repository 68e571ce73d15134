"""`amusd-mq`: run a service, generate from a running deployment, or run the self-contained demo.

torch, transformers and the HTTP stack are imported inside the commands that use them, each where it is needed:
every command checks its settings first, so a service given a bad one exits in a fraction of a second instead of
after seconds of imports, and a client command never loads them. Benchmark code too, so that no service's process
holds any."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import uvloop
import zmq.asyncio
from tqdm import tqdm

from .. import config as c
from .. import models
from ..frontend.client import AmusdError, AsyncClient
from ..sampling import MODES, requested
from ..tasks import first_to_end
from ..wire.codes import Mode
from ..wire.faults import Faults
from ..wire.security import keygen, load_keys
from ..wire.transport import http_listener
from .launch import Deployment, ServiceExited, service_env

DEMO_PROMPT = 'def quicksort(arr):\n    """Sort a list of numbers with quicksort and return a new list."""\n'


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="amusd-mq", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for role in c.SERVICES:
        c.add_flags(sub.add_parser(role, help=f"run the {role} service"), role)
    c.add_flags(sub.add_parser("gateway", help="run the OpenAI-compatible HTTP gateway"), c.GATEWAY)
    gen = sub.add_parser("generate", help="stream a generation from a running deployment, then its stats")
    gen.add_argument("prompt")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--request-lookahead", type=int, default=None, help="override the lookahead for this request")
    _sampling_flags(gen, seed=None)
    c.add_flags(gen, c.CLIENT)
    demo = sub.add_parser("demo", help="start all three services, generate, and compare with the verify model alone")
    demo.add_argument("--prompt", default=DEMO_PROMPT)
    demo.add_argument("--max-new-tokens", type=int, default=128)
    c.add_flags(demo)
    bench = sub.add_parser("bench", help="ar vs synchronous vs asynchronous speculation, against the ideal")
    bench.add_argument("--backend", choices=("hf", "trace"), default="hf")
    bench.add_argument("--trace", help="trace file for --backend trace (amusd-mq record-trace writes one)")
    _dataset_flags(bench)
    bench.add_argument("--gammas", default="2,4,6", help="draft lengths for sd, comma-separated")
    bench.add_argument("--strategies", default="ar,sd,async,amusd-policy",
                       help="any of ar, sd, async, amusd-policy")
    bench.add_argument("--concurrency", default=None,
                       help="a load test instead: closed-loop clients at each of these levels, e.g. 1,4,16,64, "
                            "batched ar against async")
    bench.add_argument("--requests", type=int, default=None,
                       help="requests per load level (default: 4 per client, at least one per prompt)")
    bench.add_argument("--out", default=None, help="results folder (default bench-results/<date-time>)")
    _sampling_flags(bench, seed=0)
    c.add_flags(bench)
    rec = sub.add_parser("record-trace", help="record the draft/verify decisions of a real pair on a dataset")
    _dataset_flags(rec)
    rec.add_argument("--out", required=True, help="trace file to write")
    c.add_flags(rec)
    keys = sub.add_parser("keygen", help="write CURVE key pairs and the coordinator's allow-list; print the settings")
    keys.add_argument("dir")
    keys.add_argument("--names", default="coordinator,draft,verify,client",
                      help="one key pair each; every name but coordinator is allowed to connect")
    args = parser.parse_args(argv)
    if args.command == "keygen":
        sys.exit(keygen_main(args.dir, args.names.split(","), parser))
    try:
        cfg = c.load(args)
        if args.command in (*c.SERVICES, c.GATEWAY, "generate"):
            _check_keys(cfg, c.CLIENT if args.command == "generate" else args.command)
    except ValueError as exc:  # a setting past its bound: refused before anything starts, as a misconfiguration
        parser.exit(2, f"amusd-mq {args.command}: {exc}\n")
    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.command in c.SERVICES:
        sys.exit(run_service(args.command, cfg, c.is_set("runner", args)))
    if args.command == c.GATEWAY:
        sys.exit(gateway_main(cfg))
    if args.command == "generate":
        sys.exit(_run(_generate(cfg, args.prompt, max_new_tokens=args.max_new_tokens, lookahead=args.request_lookahead,
                                temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                                sampling_mode=args.sampling_mode)))
    if args.command == "demo":
        sys.exit(demo_main(cfg, args.prompt, args.max_new_tokens))
    try:
        sys.exit(bench_main(cfg, args) if args.command == "bench" else record_main(cfg, args))
    except ValueError as exc:
        parser.error(str(exc))


def gateway_main(cfg: c.Config) -> int:
    try:
        listener = http_listener(cfg.http_host, cfg.http_port)
    except c.ConfigurationError as exc:
        logging.getLogger("amusd_mq").error("%s", exc)
        return 2
    from ..frontend.gateway import serve  # the HTTP stack loads only where it serves, and after the socket listens

    return serve(cfg, listener)


def _sampling_flags(parser: argparse.ArgumentParser, seed: int | None) -> None:
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top-k", type=int, default=0, help="0: no limit")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--sampling-mode", choices=MODES, default=None,
                        help="greedy, seeded (the verify model's own sample for --seed) or exact (its distribution); "
                             "default: greedy at temperature 0, else exact")
    parser.add_argument("--seed", type=int, default=seed,
                        help="prompt i is sampled with seed + i" if seed is not None else
                        "default: the coordinator's pick")


def _check_keys(cfg: c.Config, role: str) -> None:
    """Refuse half a CURVE configuration, or an unreadable key, before anything loads."""
    load_keys(role, cfg.curve_secret_key, cfg.curve_allow_dir if role == c.COORDINATOR else cfg.curve_server_key)


def keygen_main(directory: str, names: list[str], parser: argparse.ArgumentParser) -> int:
    try:
        settings = keygen(directory, names)
    except ValueError as exc:
        parser.error(str(exc))
    print(f"keys written to {directory}; give each secret key to its owner only. Settings:")
    for name, env in settings.items():
        print(f"  {name}: " + " ".join(f"{k}={v}" for k, v in env.items()))
    return 0


def _dataset_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", default="humaneval", help="humaneval, refactor, or a JSONL file of prompts")
    parser.add_argument("--prompts", type=int, default=10, help="how many prompts")
    parser.add_argument("--max-new-tokens", type=int, default=128)


def _tokenized(cfg: c.Config, args) -> list[tuple[str, list[int]]]:
    from ..bench import datasets  # benchmark code stays out of the services' processes
    from ..text.vocab import load_tokenizer  # transformers

    tokenizer = load_tokenizer(models.resolve(cfg.verify_model, cfg.cache_dir))
    return [(pid, tokenizer(text)["input_ids"]) for pid, text in datasets.load(args.dataset, args.prompts)]


def bench_main(cfg: c.Config, args) -> int:
    from ..bench.run import Bench, format_table  # torch, transformers
    from ..bench.trace import PREFIX, Trace  # torch

    sampling = requested(args.sampling_mode, args.temperature, args.top_k, args.top_p, args.seed)
    trace = prompts = None
    if args.backend == "trace":
        if sampling.mode != Mode.GREEDY:
            raise ValueError("a trace records greedy decisions: sample with --backend hf")
        if not args.trace:
            raise ValueError("--backend trace needs --trace FILE")
        trace = Trace.load(args.trace)
        trace.prompts = trace.prompts[:args.prompts]
        spec = PREFIX + str(Path(args.trace).resolve())
        cfg = replace(cfg, draft_model=spec, verify_model=spec)
    else:
        prompts = _tokenized(cfg, args)
    out = Path(args.out or f"bench-results/{time.strftime('%Y%m%d-%H%M%S')}")
    if args.concurrency:
        from ..bench.load import format_load_table, run_load  # torch, transformers

        ids = [ids for _, ids in prompts] if prompts else [p.prompt_ids for p in trace.prompts]
        summary = run_load(cfg, ids, args.max_new_tokens, [int(n) for n in args.concurrency.split(",")],
                           args.requests, out)
        print(format_load_table(summary))
        print(f"results, plot and logs in {out}")
        return 0
    strategies = args.strategies.split(",")
    summary = Bench(cfg, args.backend, prompts, trace, args.max_new_tokens, [int(g) for g in args.gammas.split(",")],
                    cfg.lookahead, strategies, out, sampling).run()
    print(format_table(summary))
    for diff in summary["differences"]:
        print(f"{diff['prompt']} {diff['strategy']}: {diff['difference']}")
    print(f"results, plots and logs in {out}")
    return 0


def record_main(cfg: c.Config, args) -> int:
    from ..bench.trace import record  # torch
    from ..runtime.load import for_role  # torch, transformers

    prompts = _tokenized(cfg, args)
    draft, verify = for_role(cfg, c.DRAFT), for_role(cfg, c.VERIFY)
    with tqdm(total=len(prompts), desc="recording", unit="prompt") as bar:
        trace = record(draft, verify, prompts, args.max_new_tokens, cfg.dtype, bar)
    trace.save(args.out)
    print(f"{len(trace.prompts)} prompts, teacher-forced acceptance {trace.acceptance():.3f}, written to {args.out}")
    return 0


def _run(coro) -> int:
    return uvloop.run(coro)


def run_service(role: str, cfg: c.Config, runner_chosen: bool) -> int:
    code = _run(_service(role, cfg, runner_chosen))
    logging.shutdown()
    # The model thread is a daemon and may be mid-forward: leave without waiting for it.
    os._exit(code)


async def _service(role: str, cfg: c.Config, runner_chosen: bool) -> int:
    faults = Faults.of(cfg)
    if faults is None:
        return await _serve_role(role, cfg, runner_chosen, zmq.asyncio.Context.instance())
    logging.getLogger("amusd_mq").warning("injecting message faults: %s", faults)
    try:
        return await _serve_role(role, cfg, runner_chosen, faults.context())
    finally:
        logging.getLogger("amusd_mq").warning("message faults injected: %s", dict(faults.counts))


async def _serve_role(role: str, cfg: c.Config, runner_chosen: bool, ctx: zmq.asyncio.Context) -> int:
    """A service's exit code: 0 when stopped by a signal, 2 when it can't serve as configured, 1 when a core
    task failed (logged with its traceback), so that a supervisor restarts it."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    log = logging.getLogger("amusd_mq")
    try:
        if role == c.COORDINATOR:
            from ..coordinator.shell import Coordinator  # transformers, for the tokenizer

            await Coordinator(cfg, ctx).run(stop)
        else:
            await _work(role, cfg, runner_chosen, stop, ctx)
    except c.ConfigurationError as exc:
        log.error("%s", exc)
        return 2
    except Exception:
        log.exception("the %s service failed; exiting so that it can be restarted", role)
        return 1
    return 0


async def _work(role: str, cfg: c.Config, runner_chosen: bool, stop: asyncio.Event, ctx: zmq.asyncio.Context) -> None:
    from ..runtime.load import warm_for_role  # torch, transformers
    from ..runtime.thread import ModelThread  # torch
    from ..workers.draft import DraftWorker  # torch
    from ..workers.verify import VerifyWorker  # torch

    threads = cfg.threads_of(role)
    logging.getLogger("amusd_mq").info("%s worker: %d torch thread%s (%s)", role, threads, "s" * (threads > 1),
                                       "AMUSD_THREADS" if cfg.threads else
                                       f"{len(os.sched_getaffinity(0))} cores shared by the workers on CPU devices; "
                                       f"AMUSD_THREADS sets it")
    thread = ModelThread(threads)
    loading = await first_to_end(stop, [thread.submit(warm_for_role, cfg, role, runner_chosen)])
    if loading is None:
        return
    await (DraftWorker if role == c.DRAFT else VerifyWorker)(cfg, loading.result(), thread, ctx).run(stop)


async def _generate(cfg: c.Config, prompt: str, **request) -> int:
    try:
        await stream_and_print(cfg, prompt, **request)
    except AmusdError as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
        return 1
    return 0


async def stream_and_print(cfg: c.Config, prompt: str, **kwargs):
    async with AsyncClient(cfg.coordinator_url, timeout_s=cfg.timeout_s, curve_secret_key=cfg.curve_secret_key,
                           curve_server_key=cfg.curve_server_key) as client:
        stream = client.stream(prompt, **kwargs)
        async for chunk in stream:
            print(chunk.text, end="", flush=True)
    print()
    print_stats(stream.result.finish_reason, stream.result.stats)
    return stream.result


def print_stats(finish_reason: str, stats: dict) -> None:
    print(f"finish: {finish_reason}")
    for key, value in stats.items():
        print(f"  {key:<24} {value:.3f}" if isinstance(value, float) else f"  {key:<24} {value}")


def demo_main(cfg: c.Config, prompt: str, max_new_tokens: int) -> int:
    """Bring up coordinator, verify and draft as child processes, generate, compare, tear down."""
    print(f"draft  model: {cfg.draft_model} on {cfg.draft_device}")
    print(f"verify model: {cfg.verify_model} on {cfg.verify_device}")
    for name in (cfg.draft_model, cfg.verify_model):
        models.resolve(name, cfg.cache_dir)  # download and convert here, with progress bars, before the services
    signal.signal(signal.SIGTERM, _exit_on_signal)  # so the finally below stops the children
    with tempfile.TemporaryDirectory(prefix="amusd-demo-") as tmp:
        url = f"ipc://{tmp}/coordinator"
        deployment = Deployment(service_env(cfg, url), log_dir=f"{tmp}/logs")
        try:
            print("starting coordinator, verify and draft services ...", flush=True)
            _run(deployment.wait_ready())
            print(f"--- speculative generation ({url}) ---\n{prompt}", end="", flush=True)
            client_cfg = c.load(env={"AMUSD_COORDINATOR_URL": url, "AMUSD_TIMEOUT_S": str(cfg.timeout_s)})
            result = _run(stream_and_print(client_cfg, prompt, max_new_tokens=max_new_tokens))
        except (ServiceExited, TimeoutError) as exc:
            print(f"\ndemo failed: {exc}", file=sys.stderr)
            return 1
        finally:
            deployment.stop()
    ar_threads = len(os.sched_getaffinity(0))
    print(f"\n--- the verify model alone ({ar_threads} threads) ---", flush=True)
    import torch

    from ..bench.baselines import autoregressive, explain_difference  # torch
    from ..runtime.load import warm_for_role  # torch, transformers

    torch.set_num_threads(ar_threads)
    lm = warm_for_role(cfg, c.VERIFY)
    start = time.perf_counter()
    ar_ids = autoregressive(lm, result.prompt_ids, max_new_tokens, lm.eos_token_ids).token_ids
    ar_s = time.perf_counter() - start
    spec_rate = result.stats["tokens_per_s"]
    print(f"{'':<22}{'speculative':>14}{'verify alone':>14}")
    print(f"{'CPU threads':<22}{f'{cfg.threads_of(c.DRAFT)}+{cfg.threads_of(c.VERIFY)}':>14}{ar_threads:>14}")
    print(f"{'tokens':<22}{len(result.token_ids):>14}{len(ar_ids):>14}")
    print(f"{'tokens/s':<22}{spec_rate:>14.2f}{len(ar_ids) / ar_s:>14.2f}")
    print(f"{'speedup':<22}{spec_rate * ar_s / len(ar_ids):>13.2f}x")
    print(f"{'acceptance rate':<22}{result.stats['acceptance_rate']:>14.2f}")
    print(f"{'tokens / verify step':<22}{result.stats['tokens_per_verify_step']:>14.2f}")
    same = ar_ids == result.token_ids
    print(f"{'identical output':<22}{'yes' if same else 'NO':>14}")
    if not same:
        print(explain_difference(lm, result.prompt_ids, ar_ids, result.token_ids))
    return 0


def _exit_on_signal(signum, frame):
    sys.exit(128 + signum)
