"""The request validator: each rule refuses with words that name it, and the client and the coordinator refuse a
request by the very same rule and message (the gateway's bounds are the client's: tests/frontend/test_gateway.py)."""
import pytest

from amusd_mq import config, models, validate
from amusd_mq.coordinator.core import Core
from amusd_mq.frontend.client import InvalidRequestError, _request
from amusd_mq.text.vocab import Vocabulary
from amusd_mq.wire import protocol as p

VOCAB = Vocabulary.of(models.tiny_tokenizer())
DEFAULTS = dict(prompt=None, prompt_ids=None, messages=None, max_new_tokens=4, stop_token_ids=[], stop=[],
                ignore_eos=False, lookahead=None, policy="eager", temperature=0.0, top_k=0, top_p=1.0, seed=None,
                mode=None)
CASES = [
    (dict(prompt=""), "the prompt is empty"),
    (dict(prompt_ids=[]), "the prompt is empty"),
    (dict(messages=[]), "the prompt is empty"),
    (dict(prompt="x", prompt_ids=[1]), "give exactly one of prompt, prompt_ids and messages"),
    (dict(), "give exactly one of prompt, prompt_ids and messages"),
    (dict(prompt="x", max_new_tokens=0), "max_new_tokens must be at least 1"),
    (dict(prompt="x", max_new_tokens=-1), "max_new_tokens: expected int in [0, 2**63)"),
    (dict(prompt="x", max_new_tokens=10 ** 30), "max_new_tokens: expected int"),
    (dict(prompt="x", max_new_tokens="4"), "max_new_tokens: expected int"),
    (dict(prompt_ids=[1, -3]), "prompt_ids: expected list[int in [0, 2**63)] | None"),
    (dict(prompt=7), "prompt: expected str | None"),
    (dict(messages=[{"role": "user", "content": 1}]), "messages: expected"),
    (dict(prompt="x", stop=[""]), "stop strings must not be empty"),
    (dict(prompt="x", stop_token_ids=[-1]), "stop_token_ids: expected"),
    (dict(prompt="x", lookahead=0), "lookahead must be in [1, 64], not 0"),
    (dict(prompt="x", policy="eagerest"), "policy must be one of"),
    (dict(prompt="x", temperature=-0.1), "temperature must be a finite number >= 0"),
    (dict(prompt="x", temperature=5e-324), "temperature must be 0 (greedy) or at least"),
    (dict(prompt="x", temperature=0.8, top_p=1.5), "top_p must be in (0, 1]"),
    (dict(prompt="x", temperature=0.8, top_k=-1), "top_k: expected int"),
    (dict(prompt="x", mode="seeded"), "needs a temperature > 0"),
    (dict(prompt="x", mode="beam"), "sampling_mode must be one of"),
    (dict(prompt="x", seed=1 << 63), "seed: expected int in [0, 2**63) | None"),
]


def coordinator_refusal(msg: p.Generate) -> p.Error:
    core = Core(config.load(env={}), VOCAB)
    core.handle(b"verifier", [p.Register(role="verify", model="m", runner="native", kernels="aten", vocab_size=258,
                                         vocab_hash=VOCAB.hash, max_context=64, eos_token_ids=[2], max_batch=4)], 0.0)
    (refusal,) = core.handle(b"client", [msg], 0.0).to(b"client")
    return refusal


@pytest.mark.parametrize("fields,words", CASES)
def test_the_client_and_the_coordinator_refuse_a_request_by_the_same_rule(fields, words):
    args = {**DEFAULTS, **fields}
    with pytest.raises(InvalidRequestError) as by_client:
        _request(**args)
    assert words in str(by_client.value)
    mode = args.pop("mode")
    unchecked = p.Generate(req_id="r1", **args, sampling_mode=mode)  # as a client that checks nothing sends it
    with pytest.raises(validate.Invalid, match=".") as by_rule:
        validate.request(unchecked, seed=0)
    refusal = coordinator_refusal(unchecked)
    assert str(by_client.value) == str(by_rule.value) == refusal.message and refusal.code == "invalid_request"


def test_a_request_within_every_bound_passes_and_gets_its_sampling():
    msg = _request(**{**DEFAULTS, "prompt": "x", "temperature": 1, "top_k": 5, "seed": 9, "lookahead": 64})
    assert msg.temperature == 1.0 and type(msg.temperature) is float and msg.sampling_mode == "exact"
    sampling = validate.request(msg, seed=9)
    assert (sampling.mode, sampling.temperature, sampling.top_k, sampling.seed) == ("exact", 1.0, 5, 9)
    assert p.decode(p.encode(msg), 1 << 20) == msg  # what the client checked is what the wire accepts


INFO = p.Register(role="verify", model="m", runner="native", kernels="aten", vocab_size=258, vocab_hash="h",
                  max_context=64, eos_token_ids=[2], max_batch=4)


@pytest.mark.parametrize("fields,has,words", [
    (dict(prompt="x"), dict(tokenizer=False, chat=False), "no tokenizer; send prompt_ids"),
    (dict(messages=[{"role": "user", "content": "hi"}]), dict(tokenizer=True, chat=False), "has no chat template"),
    (dict(prompt="x" * (64 * validate.MAX_PROMPT_BYTES_PER_TOKEN + 1)), dict(tokenizer=True, chat=True),
     "can't fit the model context of 64 tokens"),
    (dict(prompt_ids=[1], stop=["a"]), dict(tokenizer=False, chat=False), "stop strings need the verify model's"),
])
def test_what_needs_the_serving_model_is_refused_before_tokenizing(fields, has, words):
    msg = p.Generate(req_id="r", max_new_tokens=4, **fields)
    with pytest.raises(validate.Invalid, match=words):
        validate.serving(msg, INFO, "m", **has)


def test_a_chat_with_stop_strings_is_served_by_a_model_with_a_tokenizer_and_a_template():
    msg = p.Generate(req_id="r", max_new_tokens=4, messages=[{"role": "user", "content": "hi"}], stop=["a"])
    validate.serving(msg, INFO, "m", tokenizer=True, chat=True)


@pytest.mark.parametrize("ids,max_new,words", [
    ([], 4, "the prompt is empty"), ([1] * 61, 4, "prompt of 61 tokens plus max_new_tokens=4 exceeds"),
    ([1, 258], 4, "token ids [258] are outside the vocabulary of 258"),
])
def test_the_prompts_ids_must_fit_the_context_and_the_vocabulary(ids, max_new, words):
    msg = p.Generate(req_id="r", max_new_tokens=max_new, prompt_ids=ids)
    with pytest.raises(validate.Invalid) as refused:
        validate.prompt_ids(ids, msg, INFO)
    assert words in str(refused.value)
    validate.prompt_ids([1] * 60, msg, INFO)  # exactly the context: served
