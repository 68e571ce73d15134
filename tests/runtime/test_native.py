"""The native forward against transformers' own, on tiny Llama and Qwen2 configs covering what we serve."""
import asyncio
import logging

import pytest
import torch
import torch.nn.functional as F
from conftest import kernel_paths, mismatches_alone_and_in_a_pass
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from amusd_mq import models
from amusd_mq.runtime.load import load
from amusd_mq.runtime.native import UnsupportedModel

BASE = dict(vocab_size=258, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            max_position_embeddings=512)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
CONFIGS = {
    "llama untied, GQA": (LlamaForCausalLM, LlamaConfig(**BASE, num_key_value_heads=2, tie_word_embeddings=False)),
    "llama tied, q/k/v/o bias": (LlamaForCausalLM, LlamaConfig(**BASE, tie_word_embeddings=True, attention_bias=True)),
    "llama3 rope scaling, GQA": (LlamaForCausalLM, LlamaConfig(**BASE, num_key_value_heads=1, rope_theta=500000.0,
                                                               rope_scaling=LLAMA3_ROPE)),
    "qwen2 tied, q/k/v bias": (Qwen2ForCausalLM, Qwen2Config(**BASE, num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen2 untied": (Qwen2ForCausalLM, Qwen2Config(**BASE, num_key_value_heads=4, tie_word_embeddings=False,
                                                   rms_norm_eps=1e-5, rope_theta=1e6)),
}


def save(tmp_path, model_cls, config) -> str:
    """A model directory as the services load it: weights, config and the tiny byte-level tokenizer."""
    torch.manual_seed(0)
    model = model_cls(config).eval()
    with torch.no_grad():  # larger weights than the initialisation's, so that logits differ by more than noise
        for param in model.parameters():
            param.mul_(4)
    model.save_pretrained(tmp_path)
    models.tiny_tokenizer().save_pretrained(tmp_path)
    return str(tmp_path)


@pytest.mark.parametrize("kernels", ["aten", "onednn"])
@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_transformers(tmp_path, name, kernels):
    path = save(tmp_path, *CONFIGS[name])
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    lm = load(path, "cpu", "float32", runner="native", max_context=256, kernels=kernels)
    assert lm.runner == "native" and kernel_paths(lm.kernels) == {kernels}
    ids = torch.randint(0, 258, (1, 200), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = reference(ids).logits[0]
    scale = expected.abs().max()
    with lm.session() as session:
        prefill = session.logits(ids[0, :150].tolist(), 150)  # past the llama3 original context
        steps = [session.logits(ids[0, :n].tolist(), 1) for n in range(151, 201)]
        session.rollback(170)  # and back, over positions written before
        again = session.logits(ids[0, :190].tolist(), 20)
    got = torch.cat([prefill, *steps])
    assert ((got - expected).abs().max() / scale).item() < 1e-4
    assert ((again - expected[170:190]).abs().max() / scale).item() < 1e-4


def test_each_linear_role_takes_the_kernel_it_timed_fastest(tmp_path, caplog, monkeypatch):
    from amusd_mq import config
    from amusd_mq.runtime import kernels

    assert set(kernels.PATHS) == set(config.KERNELS) - {"auto"}  # the setting offers every path there is
    path = save(tmp_path, *CONFIGS["llama untied, GQA"])
    timed = []
    real = kernels.choose

    def recorded(weights, paths):
        chosen, times, invariant = real(weights, paths)
        timed.append((chosen.name, times, invariant))
        return chosen, times, invariant

    monkeypatch.setattr(kernels, "choose", recorded)
    with caplog.at_level(logging.INFO):
        lm = load(path, "cpu", "bfloat16", max_context=64)
    every = {kernels.Kernel(kernels.PATHS[p], rows).name for p in ("aten", "onednn") for rows in kernels.ROWS}
    assert len(timed) == 5 and all(times and set(times) <= every for _, times, _ in timed)  # the invariant ones
    assert all(invariant for _, _, invariant in timed)  # on this CPU, padded to a batch, every path is
    assert all(times[name] == min(times.values()) for name, times, _ in timed)
    names = [name for name, _, _ in timed]
    assert lm.kernels == (names[0] if len(set(names)) == 1 else ",".join(
        f"{role}={name}" for role, name in zip(("qkv", "o", "gate_up", "down", "head"), names)))
    assert "linear kernels" in caplog.text


def test_a_kernel_whose_rows_depend_on_the_batch_is_taken_only_when_nothing_else_runs(caplog):
    from amusd_mq.runtime import kernels

    weights = [torch.randn(64, 32) for _ in range(3)]
    variant = kernels.Path("variant", lambda w: w, lambda x, w, b: F.linear(x, w, b) + 1e-3 * x.shape[0])
    by_row = kernels.Path("by-row", lambda w: w, lambda x, w, b: torch.stack([F.linear(row, w, b) for row in x]))
    chosen, times, invariant = kernels.choose(weights, (variant, by_row))
    assert chosen.path is by_row and invariant
    assert set(times) == {kernels.Kernel(by_row, rows).name for rows in kernels.ROWS}  # the variant one isn't timed
    chosen, times, invariant = kernels.choose(weights, (variant,))
    assert chosen.path is variant and invariant is False and len(times) == len(kernels.ROWS)
    assert chosen.name == min(times, key=times.get)


def test_a_padded_kernel_gives_each_row_what_the_path_gives_it():
    from amusd_mq.runtime import kernels

    w, b = torch.randn(48, 32), torch.randn(48)
    x = torch.randn(1, 3, 32)
    for rows in (1, 2, 4, 8):
        y = kernels.Kernel(kernels.ATEN, rows)(x, w, b)
        assert y.shape == (1, 3, 48) and torch.allclose(y, F.linear(x, w, b), atol=1e-5)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("kernels", ["auto", "aten", "onednn", "int8", "int4"])
def test_a_token_gets_the_same_logits_decoded_alone_as_verified_among_others(tmp_path, caplog, dtype, kernels):
    """Bit for bit, so that greedy speculation commits exactly what plain decoding does: in one pass of several
    tokens, beside another sequence's row, and across the attention's key blocks; wherever the kernels chosen
    say so at load, which the default choice and each quantization do on this machine, and a warning where they
    can't."""
    from amusd_mq.config import ConfigurationError
    from amusd_mq.runtime.kernels import PATHS, QUANTIZED, candidates

    path = save(tmp_path, Qwen2ForCausalLM, Qwen2Config(**{**BASE, "max_position_embeddings": 1100},
                                                         num_key_value_heads=2, tie_word_embeddings=True))
    quant = kernels if kernels in QUANTIZED else "none"
    if kernels in PATHS and PATHS[kernels] not in candidates(torch.device("cpu"), getattr(torch, dtype)):
        with pytest.raises(ConfigurationError, match=f"no {kernels} kernel for torch.{dtype}"):  # oneDNN bf16 on AVX2
            load(path, "cpu", dtype, runner="native", kernels=kernels)
        return
    with caplog.at_level(logging.WARNING):
        lm = load(path, "cpu", dtype, runner="native", slots=4, max_context=1100,
                  kernels="auto" if kernels in QUANTIZED else kernels, quant=quant)
    assert lm.model.batch_invariant or kernels != "auto"
    assert lm.model.batch_invariant == ("can differ from plain decoding" not in caplog.text)
    if not lm.model.batch_invariant:
        return
    assert mismatches_alone_and_in_a_pass(lm, [(5, 5), (60, 3), (505, 8), (510, 7), (1020, 6)]) == []


def test_long_prefill_runs_in_chunks(tmp_path, monkeypatch):
    from amusd_mq.runtime import native

    path = save(tmp_path, *CONFIGS["qwen2 untied"])
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    monkeypatch.setattr(native, "PREFILL_CHUNK", 16)
    lm = load(path, "cpu", "float32", max_context=256)
    ids = list(range(3, 103))
    with torch.inference_mode():
        expected = reference(torch.tensor([ids])).logits[0, -5:]
    with lm.session() as session:
        got = session.logits(ids, 5)
    assert ((got - expected).abs().max() / expected.abs().max()).item() < 1e-4


def test_an_unknown_architecture_is_an_error_when_native_is_chosen_and_falls_back_otherwise(tmp_path, caplog):
    path = save(tmp_path, GPT2LMHeadModel, GPT2Config(vocab_size=258, n_embd=32, n_layer=1, n_head=2))
    with pytest.raises(UnsupportedModel, match="GPT2LMHeadModel"):
        load(path, "cpu", "float32", runner="native", runner_chosen=True)
    with caplog.at_level(logging.WARNING):
        lm = load(path, "cpu", "float32", runner="native", runner_chosen=False)
    assert lm.runner == "hf" and "running it with transformers" in caplog.text
    with lm.session() as session:
        assert session.logits([1, 2, 3], 1).shape == (1, 258)


@pytest.fixture(scope="module")
def qwen2_pair(tmp_path_factory):
    """A tiny Qwen2 verifier (q/k/v bias, tied head, GQA) and a draft made of its first two layers."""
    model_cls, config = CONFIGS["qwen2 tied, q/k/v bias"]
    verify = save(tmp_path_factory.mktemp("qwen2") / "verify", model_cls, config)
    draft_model = Qwen2ForCausalLM(Qwen2Config(**{**BASE, "num_hidden_layers": 2}, num_key_value_heads=2,
                                               tie_word_embeddings=True))
    draft_model.load_state_dict(Qwen2ForCausalLM.from_pretrained(verify).state_dict(), strict=False)
    draft = str(tmp_path_factory.mktemp("qwen2") / "draft")
    draft_model.save_pretrained(draft)
    models.tiny_tokenizer().save_pretrained(draft)
    return draft, verify


@pytest.mark.asyncio
async def test_qwen2_through_the_services_is_transformers_own_output(deploy, qwen2_pair):
    from conftest import PROMPTS

    from amusd_mq import AsyncClient
    from amusd_mq.bench.baselines import autoregressive
    from amusd_mq.sampling import Sampling

    draft, verify = qwen2_pair
    d = deploy(AMUSD_DRAFT_MODEL=draft, AMUSD_VERIFY_MODEL=verify, AMUSD_RUNNER="native", AMUSD_VERIFY_DELAY_MS=10)
    await d.wait_ready(timeout_s=120)
    reference = AutoModelForCausalLM.from_pretrained(verify, dtype=torch.float32).eval()
    tokenizer = models.tiny_tokenizer()
    async with AsyncClient(d.url, timeout_s=60) as client:
        greedy = await asyncio.gather(*(client.generate(prompt, max_new_tokens=24) for prompt in PROMPTS[:20]))
        seeded = await asyncio.gather(*(
            client.generate(prompt, max_new_tokens=24, temperature=0.8, seed=i, sampling_mode="seeded")
            for i, prompt in enumerate(PROMPTS[:6])))
    for prompt, r in zip(PROMPTS, greedy):
        ids = tokenizer(prompt)["input_ids"]
        with torch.inference_mode():
            out = reference.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids)), do_sample=False,
                                     max_new_tokens=24, pad_token_id=tokenizer.pad_token_id)
        assert r.token_ids == out[0, len(ids):].tolist(), prompt
        assert r.stats["runner"] == "native"
        assert {part.split("=")[-1].split("/")[0] for part in r.stats["kernels"].split(",")} <= {"aten", "onednn"}
    assert sum(r.stats["rollbacks"] for r in greedy) > 0 and sum(r.stats["accepted"] for r in greedy) > 0
    verifier = load(verify, "cpu", "float32", runner="hf")  # its own seeded sample, through the reference runner
    for i, r in enumerate(seeded):
        alone = autoregressive(verifier, r.prompt_ids, 24, verifier.eos_token_ids, Sampling("seeded", 0.8, seed=i))
        assert r.token_ids == alone.token_ids
