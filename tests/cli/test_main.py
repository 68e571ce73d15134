"""The amusd-mq command line: the demo as a user runs it, as a process tree."""
import os
import re
import signal
import subprocess
import sys
import time

import pytest


def test_demo_runs_and_cleans_up_on_sigterm(tiny_cache, tmp_path):
    env = {**os.environ, "AMUSD_CACHE_DIR": tiny_cache, "AMUSD_VERIFY_DELAY_MS": "200"}
    demo = subprocess.Popen([sys.executable, "-m", "amusd_mq", "demo", "--draft-model", "tiny-draft",
                             "--verify-model", "tiny-verify", "--dtype", "float32", "--max-new-tokens", "500"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = ""
    while "speculative generation" not in seen:
        line = demo.stdout.readline()
        assert line, seen
        seen += line
    children = subprocess.run(["pgrep", "-P", str(demo.pid)], capture_output=True, text=True).stdout.split()
    assert len(children) == 3
    start = time.monotonic()
    demo.send_signal(signal.SIGTERM)
    demo.wait(10)
    assert time.monotonic() - start < 6
    time.sleep(0.2)
    assert not [pid for pid in children if os.path.exists(f"/proc/{pid}") and
                open(f"/proc/{pid}/stat").read().split()[2] != "Z"]


def test_demo_end_to_end_with_tiny_models(tiny_cache):
    out = subprocess.run([sys.executable, "-m", "amusd_mq", "demo", "--draft-model", "tiny-draft", "--verify-model",
                          "tiny-verify", "--dtype", "float32", "--max-new-tokens", "40"],
                         env={**os.environ, "AMUSD_CACHE_DIR": tiny_cache, "AMUSD_VERIFY_DELAY_MS": "10"},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    (line,) = [row for row in out.stdout.splitlines() if row.startswith("identical output")]
    assert line.split()[-1] == "yes", out.stdout


@pytest.mark.asyncio
async def test_generate_samples_reproducibly_with_a_seed(deploy):
    d = deploy(AMUSD_VERIFY_DELAY_MS=5)
    await d.wait_ready(timeout_s=120)

    def generate(*flags):
        return subprocess.run([sys.executable, "-m", "amusd_mq", "generate", "def fib(n):", "--max-new-tokens", "16",
                               "--coordinator-url", d.url, *flags], capture_output=True, text=True, timeout=120)

    seeded = ("--temperature", "0.9", "--sampling-mode", "seeded", "--seed", "3")
    first, again, other = generate(*seeded), generate(*seeded), generate(*seeded[:-1], "4")
    assert first.returncode == 0 and re.search(r"^ +seed +3$", first.stdout, re.M), first.stdout + first.stderr
    text = first.stdout.split("finish:")[0]
    assert text == again.stdout.split("finish:")[0] != other.stdout.split("finish:")[0]
    refused = generate("--temperature", "0.9", "--top-p", "1.5")
    assert refused.returncode == 1 and "top_p must be in (0, 1]" in refused.stderr
