# The verify model's own greedy output (transformers, bf16), for the same two requests.
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from amusd_mq import models
path = models.resolve("qwen2.5-coder-1.5b-instruct")
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
chat = tok.apply_chat_template([{"role": "user", "content": "Write a Python function that reverses a string."}],
                               add_generation_prompt=True, tokenize=False)
out = []
for text, n in ((chat, 48), ("def fib(n):", 32)):
    ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.inference_mode():
        g = model.generate(ids, do_sample=False, max_new_tokens=n)
    out.append(tok.decode(g[0, ids.shape[1]:], skip_special_tokens=True))
got = open("/tmp/texts.txt").read().split("\n=====\n")
for a, b in zip(out, got):
    print("identical" if a == b else f"DIFFER:\n{a!r}\n{b!r}")
