import pytest

from amusd_mq.config import pub_url
from amusd_mq.text import vocab
from amusd_mq.text.detokenize import Detokenizer, TextStream
from amusd_mq.wire.transport import Rejects


def test_streamed_text_equals_full_decode_and_never_splits_characters(tiny_cache):
    tok = vocab.load("tiny-verify", tiny_cache).tokenizer
    text = "naïve café — 日本語 🙂 done"
    ids = tok.encode(text).ids
    assert len(ids) > len(text)  # multi-byte characters span several tokens
    detok = Detokenizer(tok)
    pieces = [detok.push([i]) for i in ids] + [detok.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)


@pytest.mark.parametrize("chunks", [1, 3, 100])
def test_a_stop_string_ends_the_text_before_it_and_is_never_sent_in_part(tiny_cache, chunks):
    tok = vocab.load("tiny-verify", tiny_cache).tokenizer
    ids = tok.encode("def f(x):\n    return x\n\nprint(f(1))").ids
    stream = TextStream(tok, ["\n\n", "never"])
    sent, kept = [], None
    for at in range(0, len(ids), chunks):
        text, kept = stream.push(ids[at:at + chunks])
        sent.append(text)
        assert "def f(x):\n    return x".startswith("".join(sent))  # "x\n" waits until "\n\n" is ruled out
        if kept is not None:
            kept += at
            break
    assert "".join(sent) == "def f(x):\n    return x"
    assert tok.decode(ids[:kept]).endswith("x\n\n")  # the token completing the stop string is the last kept


def test_without_a_stop_string_the_held_back_tail_comes_at_the_end(tiny_cache):
    tok = vocab.load("tiny-verify", tiny_cache).tokenizer
    ids = tok.encode("abc\n").ids
    stream = TextStream(tok, ["\nX"])
    text, kept = stream.push(ids)
    assert (text, kept) == ("abc", None)
    assert stream.flush() == "\n"


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
