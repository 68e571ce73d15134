import pytest

from amusd_mq import vocab
from amusd_mq.detokenize import Detokenizer
from amusd_mq.transport import Rejects, pub_url


def test_streamed_text_equals_full_decode_and_never_splits_characters(tiny_cache):
    tok = vocab.load("tiny-verify", tiny_cache).tokenizer
    text = "naïve café — 日本語 🙂 done"
    ids = tok.encode(text).ids
    assert len(ids) > len(text)  # multi-byte characters span several tokens
    detok = Detokenizer(tok)
    pieces = [detok.push([i]) for i in ids] + [detok.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)


def test_pub_url_is_derived_from_the_router_url():
    assert pub_url("tcp://10.0.0.1:5550") == "tcp://10.0.0.1:5551"
    assert pub_url("tcp://*:7000") == "tcp://*:7001"
    assert pub_url("ipc:///tmp/x") == "ipc:///tmp/x.pub"
    with pytest.raises(ValueError):
        pub_url("tcp://host")
    with pytest.raises(ValueError):
        pub_url("udp://host:1")


def test_rejects_count_every_frame_but_log_once_per_interval(caplog):
    rejects = Rejects(interval_s=60)
    for _ in range(5):
        rejects.add("malformed", "x")
    rejects.add("oversized", "y")
    assert rejects.counts == {"malformed": 5, "oversized": 1}
    assert len([r for r in caplog.records if "rejected" in r.message]) == 2
