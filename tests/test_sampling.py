"""Sampling modes: the noise is a pure function of (seed, position); seeded choices follow the tempered,
truncated distribution; exact speculative sampling reproduces the verify model's distribution (chi-square,
with a broken rule as a control); proposals and parameters are validated."""
import asyncio
from dataclasses import replace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from amusd_mq import AsyncClient
from amusd_mq.bench.baselines import speculative_sync
from amusd_mq.runtime.lm import ModelInfo
from amusd_mq.runtime.native import NativeLM, NativeModel
from amusd_mq.sampling import ACCEPT, GUMBEL, Sampling, _draw, proposal_problem, uniforms

VOCAB, SAMPLES = 12, 5000


def chi_square_p(observed: torch.Tensor, expected: torch.Tensor) -> float:
    """p-value of observed counts against expected ones; cells expected below 5 are pooled."""
    small = expected < 5
    obs = torch.cat([observed[~small], observed[small].sum(0, keepdim=True)])
    exp = torch.cat([expected[~small], expected[small].sum(0, keepdim=True)])
    keep = exp > 0
    stat = ((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()
    return float(torch.special.gammaincc(torch.tensor(float(keep.sum() - 1) / 2, dtype=torch.float64), stat / 2))


def test_uniforms_are_a_pure_function_of_seed_position_and_stream():
    a = uniforms(7, [0, 1, 2, 1 << 40], ACCEPT)
    assert torch.equal(a, uniforms(7, [0, 1, 2, 1 << 40], ACCEPT)) and a.dtype == torch.float64
    assert ((a > 0) & (a < 1)).all() and len(set(a.tolist())) == 4
    assert not torch.equal(a, uniforms(8, [0, 1, 2, 1 << 40], ACCEPT))
    assert not torch.equal(a, uniforms(7, [0, 1, 2, 1 << 40], GUMBEL))
    assert not torch.equal(uniforms(7, [0], ACCEPT), uniforms(7 + (1 << 32), [0], ACCEPT))  # the high bits count
    grid = uniforms(3, list(range(200)), GUMBEL, 500)
    assert grid.shape == (200, 500) and abs(grid.mean().item() - 0.5) < 0.01 and abs(grid.var().item() - 1 / 12) < 0.005


@pytest.mark.parametrize("params", [dict(temperature=1.0), dict(temperature=0.5), dict(temperature=1.5, top_k=4),
                                    dict(temperature=1.0, top_p=0.7)])
def test_seeded_choices_follow_the_tempered_truncated_distribution(params):
    logits = torch.linspace(-2, 2, VOCAB)[torch.randperm(VOCAB, generator=torch.Generator().manual_seed(1))]
    want = Sampling("seeded", **params).probs(logits[None])[0]
    counts = torch.zeros(VOCAB, dtype=torch.float64)
    for seed in range(SAMPLES):
        counts[Sampling("seeded", seed=seed, **params).choose(logits[None], [3])[0]] += 1
    assert counts[want == 0].sum() == 0  # truncated tokens are never chosen
    assert chi_square_p(counts, want * SAMPLES) > 0.01


def test_top_k_and_top_p_keep_what_they_should():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert (Sampling("exact", 1.0, top_p=0.8).probs(logits) > 0).tolist() == [[True, True, False, False]]
    assert (Sampling("exact", 1.0, top_p=0.81).probs(logits) > 0).tolist() == [[True, True, True, False]]
    assert (Sampling("exact", 1.0, top_k=1).probs(logits) > 0).tolist() == [[True, False, False, False]]


class Tiny(NativeLM):
    """A random-weight model with a 12-token vocabulary: small enough to enumerate its distribution."""

    def __init__(self, seed: int):
        torch.manual_seed(seed)
        config = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
        self.hf = LlamaForCausalLM(config).eval()
        with torch.no_grad():  # sharper than the initialisation, so the draft really differs from the verifier
            self.hf.lm_head.weight.mul_(10)
        native = NativeModel(config, self.hf.state_dict(), torch.device("cpu"), torch.float32, slots=4, max_len=64)
        super().__init__(native, ModelInfo(f"tiny-{seed}", VOCAB, 64, [], ""))

    def save(self, path) -> str:
        """As a model directory the services can load, with a tokenizer of one word per token id."""
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        tokenizer = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
        tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="t0").save_pretrained(path)
        self.hf.save_pretrained(path)
        return str(path)

    def joint(self, prompt: list[int], sampling: Sampling) -> torch.Tensor:
        """P(first two generated tokens), [VOCAB, VOCAB], computed exactly."""
        first = sampling.probs(self.session().logits(prompt, 1))[0]
        second = torch.stack([sampling.probs(self.session().logits(prompt + [x], 1))[0] for x in range(VOCAB)])
        return first[:, None] * second


PROMPT = [3, 1, 4, 1, 5]
DRAFT, VERIFY = Tiny(1), Tiny(2)


def speculative_counts(sampling: Sampling) -> torch.Tensor:
    counts = torch.zeros(VOCAB, VOCAB, dtype=torch.float64)
    accepted = proposed = 0
    for seed in range(SAMPLES):
        run = speculative_sync(DRAFT, VERIFY, PROMPT, 2, [], 2, replace(sampling, seed=seed))
        counts[run.token_ids[0], run.token_ids[1]] += 1
        accepted, proposed = accepted + run.accepted, proposed + run.proposed
    assert 0.05 < accepted / proposed < 0.95  # rejections and acceptances both exercised
    return counts


@pytest.mark.parametrize("params", [dict(temperature=1.0), dict(temperature=0.6), dict(temperature=1.0, top_k=5),
                                    dict(temperature=1.0, top_p=0.8)])
def test_exact_mode_reproduces_the_verify_models_distribution(params):
    sampling = Sampling("exact", **params)
    expected = VERIFY.joint(PROMPT, sampling).flatten() * SAMPLES
    assert chi_square_p(speculative_counts(sampling).flatten(), expected) > 0.01


class ResampleFromP(Sampling):
    """A classic mistake: on rejection, sample the verifier's distribution instead of the residual."""

    def verify_exact(self, logits, draft, start, q):
        tokens, accepted = super().verify_exact(logits, draft, start, q)
        if accepted < len(draft):
            u = uniforms(self.seed, [start + accepted], 99)[0]
            tokens[-1] = int(_draw(self.probs(logits)[accepted], float(u)))
        return tokens, accepted


def test_the_chi_square_test_catches_a_broken_acceptance_rule():
    sampling = ResampleFromP("exact", temperature=1.0)
    expected = VERIFY.joint(PROMPT, sampling).flatten() * SAMPLES
    assert chi_square_p(speculative_counts(sampling).flatten(), expected) < 1e-4


def test_parameters_and_proposals_are_validated():
    assert Sampling("exact", -1.0).problems() and Sampling("seeded", 0.0).problems()
    assert Sampling("exact", 1.0, top_p=0.0).problems() and Sampling("exact", 1.0, top_p=1.5).problems()
    assert Sampling("nucleus", 1.0).problems() and Sampling("exact", float("nan")).problems()
    assert not Sampling("exact", 0.7, top_k=50, top_p=0.95).problems() and not Sampling().problems()
    good = ([[1, 2]], [[0.25, 0.75]])
    assert proposal_problem("exact", [2], *good, VOCAB) is None
    assert proposal_problem("exact", [3], *good, VOCAB)  # the token is not in its own distribution
    assert proposal_problem("exact", [2], [[1, 2]], [[0.5, 0.75]], VOCAB)  # doesn't sum to 1
    assert proposal_problem("exact", [2], [[1, 99]], [[0.25, 0.75]], VOCAB)  # outside the vocabulary
    assert proposal_problem("exact", [2, 1], *good, VOCAB)  # one distribution for two tokens
    assert proposal_problem("seeded", [2], *good, VOCAB) and proposal_problem("greedy", [99], [], [], VOCAB)


@pytest.mark.asyncio
async def test_exact_mode_through_the_services_reproduces_the_distribution(deploy, tmp_path):
    """The same chi-square test, through real processes and sockets: each sample is one request. The verifier
    runs the original's policy (wait for 2 proposals), so the first two tokens both pass rejection sampling."""
    d = deploy(AMUSD_DRAFT_MODEL=DRAFT.save(tmp_path / "draft"), AMUSD_VERIFY_MODEL=VERIFY.save(tmp_path / "verify"),
               AMUSD_VERIFY_DELAY_MS=3, AMUSD_LOG_LEVEL="WARNING")
    await d.wait_ready(timeout_s=120)
    counts = torch.zeros(VOCAB, VOCAB, dtype=torch.float64)
    accepted = proposed = 0
    async with AsyncClient(d.url, timeout_s=60) as client:
        for batch in range(0, SAMPLES, 100):
            results = await asyncio.gather(*(
                client.generate(prompt_ids=PROMPT, max_new_tokens=3, ignore_eos=True, lookahead=2, temperature=1.0,
                                seed=seed, policy="amusd") for seed in range(batch, batch + 100)))
            for r in results:
                counts[r.token_ids[0], r.token_ids[1]] += 1
                accepted, proposed = accepted + r.stats["accepted"], proposed + r.stats["proposed"]
    assert proposed > SAMPLES and 0.05 < accepted / proposed < 0.95  # the draft really took part
    expected = VERIFY.joint(PROMPT, Sampling("exact", 1.0)).flatten() * SAMPLES
    assert chi_square_p(counts.flatten(), expected) > 0.01
