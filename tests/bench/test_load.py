"""The load benchmark runs both deployments at each level and writes what it promises (its numbers are not
asserted: not a timed test). It runs the tiny models and, through a recorded trace, the latency model."""
import json

from conftest import PROMPTS, traced_deployment

from amusd_mq import config
from amusd_mq.bench.load import format_load_table, run_load


def test_load_levels_for_both_strategies_with_identical_outputs(tiny_cache, tiny_verify, tmp_path):
    cfg = config.load(env={"AMUSD_DRAFT_MODEL": "tiny-draft", "AMUSD_VERIFY_MODEL": "tiny-verify",
                           "AMUSD_DTYPE": "float32", "AMUSD_CACHE_DIR": tiny_cache, "AMUSD_THREADS": "1"})
    prompts = [tiny_verify.tokenizer(t)["input_ids"] for t in PROMPTS[:6]]
    summary = run_load(cfg, prompts, 16, [1, 4], None, tmp_path / "out")
    assert [(r["concurrency"], r["strategy"]) for r in summary["table"]] == [
        (1, "ar"), (1, "async"), (4, "ar"), (4, "async")]
    for row in summary["table"]:
        assert row["identical"] == "6/6" and row["tokens"] == row["requests"] * 16
        assert row["requests"] == max(4 * row["concurrency"], 6) and row["tokens_per_s"] > 0
        assert row["ttft_p50_ms"] <= row["ttft_p99_ms"] and row["itl_p50_ms"] <= row["itl_p99_ms"]
    assert summary["table"][2]["verify_batch"] > 1  # four clients shared passes
    for name in ("results.json", "table.md", "load.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    assert json.loads((tmp_path / "out" / "results.json").read_text())["machine"]["cpus"] >= 1
    assert "| 4 | async |" in format_load_table(summary)


def test_load_through_a_trace_replay(tiny_cache, tiny_draft, tiny_verify, tmp_path):
    _, prompts, cfg = traced_deployment(tiny_cache, tiny_draft, tiny_verify, tmp_path, 3,
                                        {"draft_ms": 0.5, "verify_ms": {"1": 3, "32": 5}})
    summary = run_load(cfg, [ids for _, ids in prompts], 16, [2], 4, tmp_path / "out")
    assert [r["identical"] for r in summary["table"]] == ["3/3", "3/3"]
