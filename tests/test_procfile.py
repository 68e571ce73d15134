"""The Procfile as a new user runs it: `honcho start`, then at once a request through the official openai client."""
import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import openai
from conftest import PROMPTS

ROOT = Path(__file__).resolve().parent.parent


def test_honcho_start_then_a_request_at_once_gets_the_verify_models_text(tiny_cache, reference, tiny_verify):
    """With the thread setting at its default: the two workers share the host's cores (each once took them all)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "AMUSD_COORDINATOR_URL": f"ipc://{tempfile.mkdtemp(prefix='amp-')}/c", "AMUSD_HTTP_PORT": str(port),
           "AMUSD_DRAFT_MODEL": "tiny-draft", "AMUSD_VERIFY_MODEL": "tiny-verify", "AMUSD_DTYPE": "float32",
           "AMUSD_CACHE_DIR": tiny_cache}
    env.pop("AMUSD_THREADS", None)
    honcho = subprocess.Popen([sys.executable, "-m", "honcho", "-f", str(ROOT / "Procfile"), "-d", str(ROOT), "start"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")  # its default retries
        r = client.completions.create(model="tiny-verify", prompt=PROMPTS[0], max_tokens=12, temperature=0)
        expected = reference(tiny_verify.tokenizer(PROMPTS[0])["input_ids"], 12)
        assert r.choices[0].text == tiny_verify.tokenizer.decode(expected, skip_special_tokens=True)
    finally:
        os.killpg(honcho.pid, signal.SIGTERM)
        out, _ = honcho.communicate(timeout=30)
    assert b"gateway" in out and b"coordinator" in out
    share = max(1, len(os.sched_getaffinity(0)) // 2)
    for role in ("verify", "draft"):
        assert f"{role} worker: {share} torch thread".encode() in out, out.decode(errors="replace")[-3000:]
