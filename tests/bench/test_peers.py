"""The peer benchmark's own servers, on tiny models: started together, taking turns chat by chat while the others
are paused, their chats timed, their text compared."""
import argparse

from amusd_mq.bench import peers


def test_the_peer_benchmark_runs_servers_in_turns_and_compares_their_text(tmp_path, tiny_cache, monkeypatch):
    for key, value in {"AMUSD_DRAFT_MODEL": "tiny-draft", "AMUSD_VERIFY_MODEL": "tiny-verify", "AMUSD_DTYPE": "float32",
                       "AMUSD_CACHE_DIR": tiny_cache, "AMUSD_HEARTBEAT_S": "0.25"}.items():
        monkeypatch.setenv(key, value)
    args = argparse.Namespace(vllm_python="", vllm_guesses="", threads=1)
    [group] = peers.groups(args)
    chosen = [s for s in group if s.name in ("amusd-ar", "amusd-spec")]
    results = peers.run_groups([chosen], peers.CHATS[:2], 8, 1, tmp_path)
    assert [r["server"] for r in results] == ["amusd-ar", "amusd-spec"]
    assert all(s.proc is None for s in chosen)  # stopped, paused or not
    assert all(c["tokens"] == 8 and c["ms_per_token"] > 0 and c["text"] for r in results for c in r["chats"])
    text = peers.table(results, [chosen])
    assert "| 1 | amusd-spec |" in text and "2/2 (amusd-ar)" in text  # speculation writes plain decoding's text
