"""The quickstart's speed with the thread setting left at its default, beside tuned settings, in one run: `honcho
start` from the repository root with .env.example's values (the Qwen pair on CPU), then chat requests through the
official `openai` client, each setting its own honcho start, one at a time, in rounds (amusd_mq.bench.peers).

    python scripts/honcho_threads.py [--rounds 2] [--tokens 64] [--out data/results/honcho-threads]

Settings compared: the default (AMUSD_THREADS=0), the tuned one for a 2-core host (1 + 1), and 2 + 2 (what the
default gave each worker on a 2-core host before it shared the cores).
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from amusd_mq.bench.peers import CHATS, Server, report, run_rounds

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {"default": {}, "tuned": {"AMUSD_THREADS": "1"}, "2-plus-2": {"AMUSD_THREADS": "2"}}


def honcho(name: str, extra: dict[str, str]) -> Server:
    """honcho start with .env.example's values and `extra`, which listens where .env.example says (port 8000)."""
    env_file = Path(tempfile.mkdtemp(prefix="amusd-honcho-")) / ".env"
    env_file.write_text((ROOT / ".env.example").read_text() + "".join(f"{k}={v}\n" for k, v in extra.items()))
    return Server(name, ["honcho", "-d", str(ROOT), "-f", str(ROOT / "Procfile"), "start", "-e", str(env_file)],
                  8000, ("tuned",), "tuned")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--out", default="data/results/honcho-threads")
    args = parser.parse_args()
    out = Path(args.out)
    chosen = [honcho(name, extra) for name, extra in SETTINGS.items()]
    results = run_rounds(chosen, CHATS, args.tokens, args.rounds, out)
    report(out, [chosen], results, args.tokens, f"`honcho start` with .env.example's values (Qwen2.5-Coder 0.5B draft "
           f"+ 1.5B verify, bf16, native runner) and {SETTINGS}", settings=SETTINGS)


if __name__ == "__main__":
    main()
