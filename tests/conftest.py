import asyncio
import json
import shutil
import subprocess
import tempfile

import pytest
import torch
import uvloop
import zmq
import zmq.asyncio

from amusd_mq import models
from amusd_mq.cli.launch import Deployment
from amusd_mq.config import SERVICES
from amusd_mq.runtime.load import load
from amusd_mq.wire import protocol as p

PROMPTS = [
    "def fib(n):", "Hello, world", "import numpy as np\n", "The quick brown fox", "class Stack:\n    def push(",
    "SELECT * FROM users WHERE", "Once upon a time", "for i in range(10):", "# TODO: refactor this", "x = [1, 2, 3]\n",
    "<html><body>", "fn main() {", "Dear Sir or Madam,", "while True:\n    ", "print('héllo wörld')", "λx. x x",
    "return a + b", "async def fetch(url):", "#include <stdio.h>", "2 + 2 =", "The answer is", "{\"key\": ",
]


def pytest_asyncio_loop_factories(config, item):
    return {"uvloop": uvloop.new_event_loop}  # the services' loop, so tests exercise the same one


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("cache"))
    for name in models.TINY_MODELS:
        models.resolve(name, path)
    return path


@pytest.fixture(scope="session")
def tiny_verify(tiny_cache):
    """The tiny verify model as the services load it, by default on the native runner."""
    return load("tiny-verify", "cpu", "float32", tiny_cache)


@pytest.fixture(scope="session")
def tiny_draft(tiny_cache):
    return load("tiny-draft", "cpu", "float32", tiny_cache)


@pytest.fixture(scope="session")
def hf_verify(tiny_cache):
    """transformers' own tiny verify model: the reference."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(models.resolve("tiny-verify", tiny_cache), dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def reference(hf_verify):
    """The verify model's own greedy output, straight from transformers' generate()."""
    memo = {}

    def generate(prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        key = (tuple(prompt_ids), max_new_tokens)
        if key not in memo:
            with torch.inference_mode():
                out = hf_verify.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids)),
                                         do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=0)
            memo[key] = out[0, len(prompt_ids):].tolist()
        return memo[key]

    return generate


@pytest.fixture(scope="session")
def odd_draft(tiny_cache, tmp_path_factory) -> str:
    """The tiny draft with one token added to its vocabulary: a worker the coordinator must refuse."""
    from transformers import AutoTokenizer

    odd = tmp_path_factory.mktemp("odd") / "odd-draft"
    subprocess.run(["cp", "-r", models.resolve("tiny-draft", tiny_cache), str(odd)], check=True)
    tok = AutoTokenizer.from_pretrained(odd)
    tok.add_tokens(["<extra>"])
    tok.save_pretrained(odd)
    return str(odd)


@pytest.fixture(scope="session")
def saved_model(tmp_path_factory) -> str:
    """A model saved the usual way: a tokenizer made with PreTrainedTokenizerFast whose eos is a custom special token
    set after it was made, so tokenizer.json leaves it for transformers to add when it loads the files, and
    save_pretrained for both."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers import models as tokenizer_models
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("saved") / "saved-model"
    bpe = Tokenizer(tokenizer_models.BPE(vocab={ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))},
                                         merges=[]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    bpe.decoder = decoders.ByteLevel()
    made = PreTrainedTokenizerFast(tokenizer_object=bpe)
    made.eos_token = "<|turn_end|>"
    made.save_pretrained(out)
    loaded = AutoTokenizer.from_pretrained(out)
    config = LlamaConfig(vocab_size=len(loaded), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         eos_token_id=loaded.eos_token_id, tie_word_embeddings=False)
    torch.manual_seed(1)
    LlamaForCausalLM(config).save_pretrained(out)
    return str(out)


async def raw_exchange(url: str, frames: list[list[bytes]], timeout_s: float = 10.0) -> list[p.Message]:
    """Send raw frames from a bare DEALER, one at a time, and collect the coordinator's reply to each."""
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(url)
    replies = []
    try:
        for parts in frames:
            await sock.send_multipart(parts)
            replies.append(p.decode((await asyncio.wait_for(sock.recv_multipart(), timeout_s))[0], 1 << 30))
    finally:
        sock.close()
        ctx.term()
    return replies


@pytest.fixture
def curve_keys(tmp_path) -> dict[str, dict[str, str]]:
    """Fresh CURVE keys from `amusd-mq keygen`: each role's AMUSD_CURVE_* settings, by role."""
    from amusd_mq.wire.security import keygen

    return keygen(tmp_path / "keys", ["coordinator", "draft", "verify", "client"])


@pytest.fixture
def deploy(tiny_cache):
    """Start services as separate processes on a fresh ipc address; all stopped at the end of the test."""
    made: list[Deployment] = []
    sock_dir = tempfile.mkdtemp(prefix="amq-")  # short: ipc paths are limited to ~100 bytes

    def start(roles=SERVICES, **env) -> Deployment:
        base = {"AMUSD_COORDINATOR_URL": f"ipc://{sock_dir}/c{len(made)}", "AMUSD_DRAFT_MODEL": "tiny-draft",
                "AMUSD_VERIFY_MODEL": "tiny-verify", "AMUSD_DTYPE": "float32", "AMUSD_CACHE_DIR": tiny_cache,
                "AMUSD_THREADS": "1", "AMUSD_HEARTBEAT_S": "0.25", "AMUSD_LOG_LEVEL": "INFO"}
        d = Deployment({**base, **{k: str(v) for k, v in env.items()}}, f"{sock_dir}/logs{len(made)}", roles)
        made.append(d)
        return d

    yield start
    for d in made:
        d.stop()
    shutil.rmtree(sock_dir, ignore_errors=True)


def traced_deployment(tiny_cache, draft, verify, tmp_path, prompts: int, profile: dict):
    """A trace of the tiny pair on the first prompts, replayed with a latency profile: the trace, its prompts and
    the configuration that serves it."""
    from amusd_mq import config
    from amusd_mq.bench.trace import record

    tokenized = [(f"p{i}", verify.tokenizer(t)["input_ids"]) for i, t in enumerate(PROMPTS[:prompts])]
    trace = record(draft, verify, tokenized, 16, "float32")
    trace.save(tmp_path / "trace.json")
    (tmp_path / "profile.json").write_text(json.dumps(profile))
    spec = f"trace:{tmp_path / 'trace.json'}"
    cfg = config.load(env={"AMUSD_DRAFT_MODEL": spec, "AMUSD_VERIFY_MODEL": spec, "AMUSD_CACHE_DIR": tiny_cache,
                           "AMUSD_TRACE_COMPUTE": f"latency:{tmp_path / 'profile.json'}", "AMUSD_THREADS": "1"})
    return trace, tokenized, cfg


def kernel_paths(reported: str) -> set[str]:
    """The paths in a worker's reported kernels ("onednn/4", or per role "qkv=onednn/4,o=aten,...")."""
    return {part.split("=")[-1].split("/")[0] for part in reported.split(",")}


def mismatches_alone_and_in_a_pass(lm, cases, seed: int = 3) -> list[tuple[int, int]]:
    """(length, i) wherever the token at length + i gets other logits decoded alone than verified in one pass of n
    after `length` tokens, or than decoded beside another sequence's row: for each (length, n) of cases. One session
    prefills `length` once and rolls back to it between the three ways, so each reads the very same cached prefix
    (and a rollback's stale positions must not leak into the next pass); a bf16 prefill of 509 tokens of the 1.5B
    took 75 s on an AVX2 EPYC without native bf16."""
    from amusd_mq.runtime.lm import Feed

    rng = torch.Generator().manual_seed(seed)
    found = []
    for length, n in cases:
        seq = torch.randint(3, lm.vocab_size, (length + n,), generator=rng).tolist()
        with lm.session() as session, lm.session() as other:
            session.logits(seq[:length], 1)
            singles = [session.logits(seq[:i], 1)[0] for i in range(length + 1, length + n + 1)]
            other.logits(seq[:length // 2], 1)
            session.rollback(length)
            many, _ = lm.logits([Feed(session, seq, n), Feed(other, seq[:length // 2 + 1], 1)])
            session.rollback(length)
            first, _ = lm.logits([Feed(session, seq[:length + 1], 1), Feed(other, seq[:length // 2 + 2], 1)])
        found += [(length, i) for i, single in enumerate(singles) if not torch.equal(many[i], single)]
        found += [(length, -1)] if not torch.equal(first[0], singles[0]) else []
    return found

