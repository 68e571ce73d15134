"""The native runner on a GPU, CUDA graphs included, against transformers on the same GPU in float32: logits of
single and batched rows through every graph bucket, with rollbacks, and greedy decoding token for token, on tiny
Llama and Qwen2 configs. Exits non-zero on any mismatch.

    python scripts/gpu_check.py [--device cuda:0]
"""
from __future__ import annotations

import argparse
import random
import sys
import tempfile

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from amusd_mq import models
from amusd_mq.bench.baselines import autoregressive
from amusd_mq.runtime.lm import Row
from amusd_mq.runtime.load import load
from amusd_mq.runtime.native import TOKEN_BUCKETS, row_buckets

SLOTS = 16

BASE = dict(vocab_size=258, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=2, max_position_embeddings=1024)
CONFIGS = {"llama": (LlamaForCausalLM, LlamaConfig(**BASE)),
           "qwen2": (Qwen2ForCausalLM, Qwen2Config(**BASE, tie_word_embeddings=True))}


def check(name: str, device: str) -> list[str]:
    model_cls, config = CONFIGS[name]
    path = tempfile.mkdtemp(prefix=f"gpu-check-{name}-")
    torch.manual_seed(0)
    model_cls(config).save_pretrained(path)
    models.tiny_tokenizer().save_pretrained(path)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    lm = load(path, device, "float32", runner="native", slots=SLOTS, max_context=512)
    lm.warm_up()  # captures the graphs
    assert lm.graphs is not None or device == "cpu", "no CUDA graphs were captured"
    failures, rng = [], random.Random(0)

    def full(seq):
        with torch.inference_mode():
            return reference(torch.tensor([seq], device=device)).logits[0].float()

    def close(got, want, what):
        error = ((got - want).abs().max() / want.abs().max()).item()
        if error > 1e-4:
            failures.append(f"{name} {what}: relative error {error:.2e}")

    for n_rows in row_buckets(SLOTS):
        for n_tokens in TOKEN_BUCKETS:
            sessions = [lm.session() for _ in range(n_rows)]
            rows, seqs = [], []
            for j, s in enumerate(sessions):
                seq = [rng.randrange(258) for _ in range(rng.randrange(20, 60))]
                s.logits(seq, 1)  # prefill, eager
                k = n_tokens if j == 0 else rng.randrange(1, n_tokens + 1)  # rows of different lengths
                back = rng.randrange(0, k)  # a rollback: the step overwrites what the cache held there
                s.rollback(len(seq) - back)
                fresh = [rng.randrange(258) for _ in range(k)]
                rows.append(Row(s.slot, len(seq) - back, fresh, k))
                seqs.append(seq[:len(seq) - back] + fresh)
            for got, seq, row in zip(lm.step(rows), seqs, rows):  # padded into the bucket's graph
                close(got, full(seq)[-row.n_out:], f"{n_rows} rows x {n_tokens} tokens")
            for s in sessions:
                s.close()
    for i in range(5):
        prompt = [rng.randrange(258) for _ in range(rng.randrange(5, 40))]
        ours = autoregressive(lm, prompt, 48, []).token_ids
        with torch.inference_mode():
            theirs = reference.generate(torch.tensor([prompt], device=device), do_sample=False, max_new_tokens=48,
                                        attention_mask=torch.ones(1, len(prompt), device=device),
                                        pad_token_id=0)[0, len(prompt):].tolist()
        if ours != theirs:
            failures.append(f"{name} greedy prompt {i}: {ours} against transformers' {theirs}")
    print(f"{name}: {len(row_buckets(SLOTS)) * len(TOKEN_BUCKETS)} row and token buckets and 5 greedy decodes checked, "
          f"{len(failures)} failures", flush=True)
    return failures


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda:0")
    args = ap.parse_args()
    failures = [f for name in CONFIGS for f in check(name, args.device)]
    for f in failures:
        print("FAIL", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
