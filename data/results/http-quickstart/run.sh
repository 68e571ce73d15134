#!/bin/bash
# As a new user would: honcho start with the defaults (the Qwen pair), then at once a request with the openai client.
cd "$(dirname "$0")/../../.." && . .venv/bin/activate
honcho start > /tmp/honcho.log 2>&1 &
HPID=$!
python - <<'PY'
import time, openai
t0 = time.time()
client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")
r = client.chat.completions.create(model="qwen2.5-coder-1.5b-instruct", temperature=0, max_tokens=48,
                                   messages=[{"role": "user", "content": "Write a Python function that reverses a string."}])
print(f"answered after {time.time() - t0:.1f}s")
print(repr(r.choices[0].message.content)); print(r.usage, r.choices[0].speculation)
c = client.completions.create(model="qwen2.5-coder-1.5b-instruct", prompt="def fib(n):", max_tokens=32, temperature=0)
print(repr(c.choices[0].text), c.choices[0].speculation)
open("/tmp/texts.txt", "w").write(r.choices[0].message.content + "\n=====\n" + c.choices[0].text)
PY
curl -s localhost:8000/metrics | grep -E "^amusd:(spec|generation|time_to_first_token_seconds_(sum|count)|workers)" > /tmp/metrics.txt
kill -TERM $HPID; wait $HPID
