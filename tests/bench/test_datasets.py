import json

import pytest

from amusd_mq.bench import datasets


def test_humaneval_and_its_refactoring_variant():
    rows = datasets.load("humaneval")
    assert len(rows) == 164 and rows[0][0] == "HumanEval/0" and "def " in rows[0][1]
    refactor = datasets.load("refactor", limit=3)
    assert len(refactor) == 3 and refactor[0][0] == "Refactor/0"
    assert refactor[0][1].startswith("Refactor this") and "return" in refactor[0][1]


def test_jsonl_prompts(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"id": "x", "prompt": "a"}) + "\n\n" + json.dumps({"prompt": "b"}) + "\n")
    assert datasets.load(str(path)) == [("x", "a"), ("2", "b")]
    path.write_text(json.dumps({"text": "no prompt"}))
    with pytest.raises(ValueError, match="prompt"):
        datasets.load(str(path))
    with pytest.raises(ValueError, match="humaneval, refactor or a JSONL"):
        datasets.load("no-such-dataset")
