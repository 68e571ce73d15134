"""Step times of each runner, beside the memory floor: `python -m amusd_mq.bench.steps`.

A step is what a worker's forward pass costs: rows of new tokens after a context already in the cache, through
the runner's `step`, plus the argmax and the one copy to the host a verdict needs. The floor is every weight read
once, at the copy bandwidth measured in the same run. Also plain decoding (`ar`) of 64 tokens, per token, the
runners taking turns. The native runner runs once per kernel path asked for (`--kernels`: `auto`, the worker's
own choice, labelled `native`; `aten` or `onednn`, labelled `native/aten` and so on; `int8` or `int4`, the
quantized model). The models are Llama shapes with random weights, or real models by name. Writes steps.json, and a
latency profile per runner (the draft's one-token step, the verifier's step by tokens) for `amusd-mq bench
--trace-compute latency:...`.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from ..runtime.kernels import QUANTIZED
from ..runtime.lm import LM, Row
from ..runtime.load import load
from .baselines import autoregressive
from .run import cpu_line
from .simulate import ms_per_token
from .trace import SHAPES, shaped_lm

SHAPES_OF_ROWS = [(1, 1), (1, 2), (1, 4), (1, 8), (1, 16), (4, 4), (8, 4)]  # (rows, tokens per row)
AR_ROUNDS = 3


def copy_bandwidth(device: torch.device, size: int = 1 << 30) -> float:
    """Bytes per second a device-to-device copy moves, counting what it reads and what it writes."""
    src = torch.empty(size, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    _sync(device)
    start = time.perf_counter()
    for _ in range(10):
        dst.copy_(src)
    _sync(device)
    return 2 * size * 10 / (time.perf_counter() - start)


def weight_bytes(lm: LM) -> int:
    if lm.runner == "native":
        return lm.model.weight_bytes()
    return sum(p.numel() * p.element_size() for p in lm.model.parameters())


def step_ms(lm: LM, rows: int, tokens: int, context: int, reps: int) -> float:
    """The median time of a step of `rows` rows of `tokens` tokens each, after `context` tokens of each."""
    sessions = [lm.session() for _ in range(rows)]
    prompt = list(range(1, context + 1))
    for s in sessions:
        s.logits(prompt, 1)
    batch = [Row(s.slot, context, list(range(100, 100 + tokens)), tokens) for s in sessions]
    times = []
    for _ in range(reps + 3):
        start = time.perf_counter()
        for logits in lm.step(batch):
            logits.argmax(-1).tolist()
        times.append(time.perf_counter() - start)
    for s in sessions:
        s.close()
    return 1000 * statistics.median(times[3:])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def paths(kernels: str) -> tuple[str, str]:
    """--kernels' value as (AMUSD_KERNELS, quantization)."""
    return ("auto", kernels) if kernels in QUANTIZED else (kernels, "none")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="llama-3.2-1b,llama-3.1-8b",
                    help=f"draft,verify: shapes with random weights ({', '.join(SHAPES)}) or model names")
    ap.add_argument("--runners", default="native,hf")
    ap.add_argument("--kernels", default="auto", help="the native runner's kernel paths, comma-separated: auto, aten, "
                    "onednn, or a weight-only quantization (int8, int4: the quantized model, auto's kernel for it)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--context", type=int, default=256, help="tokens already in the cache")
    ap.add_argument("--max-context", type=int, default=1024, help="the KV cache's length")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, out = torch.device(args.device), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    draft_name, verify_name = args.models.split(",")
    bandwidth = copy_bandwidth(device)
    name = (torch.cuda.get_device_name(device) if device.type == "cuda" else
            f"{cpu_line()}, {torch.get_num_threads()} threads")
    results = {"device": name, "torch": torch.__version__, "dtype": args.dtype, "context": args.context,
               "copy_bandwidth_tb_s": bandwidth / 1e12, "ar": [], "steps": []}
    print(f"{name}: copy bandwidth {bandwidth / 1e12:.3f} TB/s (read + write)", flush=True)
    variants = [(runner, kernels) for runner in args.runners.split(",")
                for kernels in (args.kernels.split(",") if runner == "native" else ["auto"])]
    labels = {v: v[0] if v[1] == "auto" else f"{v[0]}/{v[1]}" for v in variants}
    profiles: dict[str, dict] = {label: {} for label in labels.values()}
    for role, model in (("draft", draft_name), ("verify", verify_name)):
        lms = {labels[runner, kernels]: (
            shaped_lm(model, runner, args.device, args.dtype, 9, args.max_context, *paths(kernels)) if model in SHAPES
            else load(model, args.device, args.dtype, args.cache_dir, runner, 9, args.max_context, True,
                      *paths(kernels)))
            for runner, kernels in variants}
        for lm in lms.values():
            lm.warm_up()
        prompt = list(range(1, args.context + 1))
        ar_ms = {label: [] for label in lms}
        for _ in range(AR_ROUNDS):  # the runners take turns, so that drift hits them alike
            for runner, lm in lms.items():
                ar = autoregressive(lm, prompt, 64, [])
                ar_ms[runner].append(1000 * ms_per_token(ar.times))
        for runner, lm in lms.items():
            ms = statistics.median(ar_ms[runner])
            results["ar"].append({"runner": runner, "kernels": lm.kernels, "model": model, "ms_per_token": ms})
            print(f"{runner:>13} {model:>28} ar: {ms:7.2f} ms per token (median of {AR_ROUNDS})", flush=True)
            floor_ms = 1000 * weight_bytes(lm) / bandwidth
            for rows, tokens in SHAPES_OF_ROWS:
                if lm.runner == "hf" and rows > 1:
                    continue  # the reference runs rows one after another: nothing to learn
                ms = step_ms(lm, rows, tokens, args.context, args.reps)
                results["steps"].append({"runner": runner, "kernels": lm.kernels, "model": model, "rows": rows,
                                         "tokens": tokens, "ms": ms, "floor_ms": floor_ms, "of_floor": ms / floor_ms})
                print(f"{runner:>13} {model:>28} {rows} x {tokens:>2}: {ms:7.2f} ms ({ms / floor_ms:4.2f}x the "
                      f"{floor_ms:.2f} ms floor)", flush=True)
                if rows == 1:
                    if role == "draft" and tokens == 1:
                        profiles[runner]["draft_ms"] = ms
                    if role == "verify":
                        profiles[runner].setdefault("verify_ms", {})[str(tokens)] = ms
        del lms, lm
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for label, profile in profiles.items():
        (out / f"{label.replace('/', '-')}-profile.json").write_text(json.dumps(profile))
    (out / "steps.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
