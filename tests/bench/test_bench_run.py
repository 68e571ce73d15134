"""The benchmark runs end to end and writes what it promises (its numbers are not asserted: not a timed test)."""
import json

import pytest
from conftest import PROMPTS, traced_deployment

from amusd_mq import config
from amusd_mq.bench.run import Bench, format_table
from amusd_mq.sampling import Sampling


def test_bench_writes_table_json_and_plots(tiny_cache, tiny_draft, tiny_verify, tmp_path):
    trace, _, cfg = traced_deployment(tiny_cache, tiny_draft, tiny_verify, tmp_path, 2,
                                      {"draft_ms": 0.5, "verify_ms": {"1": 3, "8": 4}})
    summary = Bench(cfg, "trace", None, trace, 16, [2, 3], 4, ["ar", "sd", "async", "amusd-policy"],
                    tmp_path / "out").run()
    assert [r["strategy"] for r in summary["table"]] == ["ar", "sd-2", "sd-3", "async", "amusd-policy"]
    assert all(r["identical"] == "2/2" for r in summary["table"])
    assert summary["best_sd"] in ("sd-2", "sd-3") and summary["alpha"] == trace.acceptance()
    for name in ("results.json", "table.md", "progress.png", "speedup.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert len(saved["results"]) == 2 * 5 and saved["machine"]["cpus"] >= 1
    assert all(r["ideal_ms_per_token"] > 0 for r in saved["results"])
    assert "| async |" in format_table(summary)


@pytest.mark.parametrize("mode", ["seeded", "exact"])
def test_bench_samples_in_every_strategy(tiny_cache, tiny_verify, tmp_path, mode):
    cfg = config.load(env={"AMUSD_DRAFT_MODEL": "tiny-draft", "AMUSD_VERIFY_MODEL": "tiny-verify",
                           "AMUSD_DTYPE": "float32", "AMUSD_CACHE_DIR": tiny_cache, "AMUSD_THREADS": "1"})
    prompts = [(f"p{i}", tiny_verify.tokenizer(t)["input_ids"]) for i, t in enumerate(PROMPTS[:2])]
    summary = Bench(cfg, "hf", prompts, None, 12, [3], 4, ["ar", "sd", "async"], tmp_path / "out",
                    Sampling(mode, 0.8, top_k=20, seed=5)).run()
    rows = {r["strategy"]: r for r in summary["table"]}
    assert summary["sampling"]["mode"] == mode and set(rows) == {"ar", "sd-3", "async"}
    assert summary["runner"] == "native"
    # seeded: every strategy gives the verify model's own seeded sample; exact: only its distribution
    assert all(r["identical"] == ("2/2" if mode == "seeded" else "-") for r in rows.values())
    assert rows["sd-3"]["acceptance"] > 0.3
