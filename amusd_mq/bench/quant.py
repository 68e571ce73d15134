"""Weight-only quantization against the unquantized models: how fast each decodes, and how often it chooses what the
unquantized verify model does, on the peer benchmark's chats.

    python -m amusd_mq.bench.quant [--quants int8,int4] [--tokens 64] [--out data/results/quant-cpu]

Every variant (the draft and the verify model, unquantized and each quantization) is loaded in this one process
and they decode each chat in turn, so that the machine's drift hits them alike. The reference is the unquantized
verify model's greedy output. A quantized verify model serves another model: reported are the chats whose output is
the reference's and the tokens before the first difference. A draft's quantization leaves the output the verify
model's and changes only how often its guesses are accepted: reported is its agreement with the reference, each
token chosen after the reference's own prefix (teacher-forced), which is the acceptance rate speculation sees.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from ..config import DRAFT, VERIFY
from ..config import load as load_config
from ..runtime.lm import LM
from ..runtime.load import load
from ..text.vocab import Vocabulary
from .baselines import autoregressive
from .peers import CHATS
from .run import cpu_line
from .simulate import ms_per_token


def teacher_forced(lm: LM, prompt: list[int], reference: list[int]) -> int:
    """How many of the reference's tokens the model chooses itself when fed the reference's prefix."""
    with lm.session() as session:
        chosen = session.greedy(prompt + reference[:-1], len(reference))
    return sum(a == b for a, b in zip(chosen, reference))


def first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quants", default="int8,int4")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", default="bench-results/quant")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config()
    quants = ["none", *(q for q in args.quants.split(",") if q)]
    variants = [(role, quant) for role in (VERIFY, DRAFT) for quant in quants]
    lms = {}
    for role, quant in variants:
        start = time.perf_counter()
        lms[role, quant] = load(cfg.model_of(role)[0], "cpu", cfg.dtype, cfg.cache_dir, slots=2, max_context=1024,
                                quant=quant)
        lms[role, quant].warm_up()
        print(f"{role} {quant}: loaded in {time.perf_counter() - start:.0f} s, kernels {lms[role, quant].kernels}",
              flush=True)
    runs = {v: [] for v in variants}
    vocab = Vocabulary.of(lms[VERIFY, "none"].tokenizer)
    for i, text in enumerate(CHATS):
        prompt = vocab.chat_ids([{"role": "user", "content": text}])
        outputs = {}
        for v in variants if i % 2 == 0 else variants[::-1]:  # in turns, the other way round every other chat
            run = autoregressive(lms[v], prompt, args.tokens, [])
            outputs[v] = run.token_ids
            runs[v].append({"ms_per_token": 1000 * ms_per_token(run.times)})
        ref = outputs[VERIFY, "none"]
        for v in variants:
            if v[0] == VERIFY:
                runs[v][-1].update(identical=outputs[v] == ref, agree_until=first_difference(outputs[v], ref))
            else:
                runs[v][-1].update(accepted=teacher_forced(lms[v], prompt, ref) / len(ref))
    rows = [{"role": role, "model": lms[role, quant].name, "quant": quant, "kernels": lms[role, quant].kernels,
             "weight_gb": lms[role, quant].model.weight_bytes() / 1e9,
             "ms_per_token": statistics.mean(c["ms_per_token"] for c in chats), "chats": chats}
            for (role, quant), chats in runs.items()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"machine": f"{cpu_line()}, {torch.get_num_threads()} threads", "date": time.strftime("%Y-%m-%d"),
               "dtype": cfg.dtype, "tokens": args.tokens, "chats": CHATS, "results": rows}
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    lines = [f"Machine: {summary['machine']}; {summary['date']}; {cfg.dtype} activations; {len(CHATS)} chats of "
             f"{args.tokens} greedy tokens, the variants taking turns; the reference is the unquantized verify "
             f"model's output.", "",
             "| model | weights | kernels | GB read per step | ms/token | against the reference |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        chats = row["chats"]
        if row["role"] == VERIFY:
            same = (f"{sum(c['identical'] for c in chats)}/{len(chats)} chats identical, the first difference after "
                    f"{statistics.mean(c['agree_until'] for c in chats):.0f} tokens on average")
        else:
            same = f"chooses its token {100 * statistics.mean(c['accepted'] for c in chats):.1f}% of the time"
        lines.append(f"| {row['model']} | {row['quant']} | {row['kernels']} | {row['weight_gb']:.2f} | "
                     f"{row['ms_per_token']:.1f} | {same} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
