"""The one validator of a generate request. The client runs `request` before it sends (the gateway through the
client), the coordinator runs it again on receipt and then, knowing the serving model, `serving` before the prompt
is tokenized and `prompt_ids` after. Every bound lives here, in the wire's field types, in `Sampling.problems` or in
the setting it comes from (`LOOKAHEAD`), and nowhere else."""
from __future__ import annotations

from .config import BY_NAME
from .sampling import Sampling, requested
from .wire import protocol as p
from .wire.codes import Policy

# A prompt longer than the context at this many UTF-8 bytes per token can't fit, and is refused before it is
# tokenized: tokenizing costs about 2 s per MiB, which a few megabytes from one client would make a stall.
MAX_PROMPT_BYTES_PER_TOKEN = 16
LOOKAHEAD = BY_NAME["lookahead"]  # a request's own lookahead has the setting's bound


class Invalid(ValueError):
    """A request that breaks a rule; the message names the rule."""


def request(msg: p.Generate, seed: int) -> Sampling:
    """Check what needs no model; returns the sampling the request asks for, drawn with `seed`."""
    wrong = p.wrong_field(msg)
    if wrong:
        raise Invalid(wrong)
    if sum(x is not None for x in (msg.prompt, msg.prompt_ids, msg.messages)) != 1:
        raise Invalid("give exactly one of prompt, prompt_ids and messages")
    if msg.prompt == "" or msg.prompt_ids == [] or msg.messages == []:
        raise Invalid("the prompt is empty")
    if not all(msg.stop):
        raise Invalid("stop strings must not be empty")
    if msg.max_new_tokens < 1:
        raise Invalid("max_new_tokens must be at least 1")
    if msg.lookahead is not None and not LOOKAHEAD.bound.admits(msg.lookahead):
        raise Invalid(f"lookahead must be {LOOKAHEAD.bound}, not {msg.lookahead}")
    if msg.policy not in tuple(Policy):
        raise Invalid(f"policy must be one of {tuple(Policy)}, not {msg.policy!r}")
    try:
        return requested(msg.sampling_mode, msg.temperature, msg.top_k, msg.top_p, seed)
    except ValueError as exc:
        raise Invalid(str(exc)) from None


def serving(msg: p.Generate, info: p.Register, model: str, tokenizer: bool, chat: bool) -> None:
    """Check what needs the serving model but not the prompt's ids."""
    if msg.prompt_ids is None:
        if not tokenizer:
            raise Invalid("the verify model has no tokenizer; send prompt_ids")
        if msg.messages is not None and not chat:
            raise Invalid(f"the verify model {model} has no chat template; send a prompt")
        text = msg.prompt or "".join(m.get("content", "") for m in msg.messages)
        size, limit = len(text.encode()), info.max_context * MAX_PROMPT_BYTES_PER_TOKEN
        if size > limit:
            raise Invalid(f"a prompt of {size} bytes can't fit the model context of {info.max_context} tokens (at "
                          f"most {limit} bytes); send prompt_ids to go beyond {MAX_PROMPT_BYTES_PER_TOKEN} bytes "
                          f"per token")
    if msg.stop and not tokenizer:
        raise Invalid("stop strings need the verify model's tokenizer")


def prompt_ids(ids: list[int], msg: p.Generate, info: p.Register) -> None:
    """Check the prompt's ids, given or tokenized, against the serving model's context and vocabulary."""
    if not ids:
        raise Invalid("the prompt is empty")
    if len(ids) + msg.max_new_tokens > info.max_context:
        raise Invalid(f"prompt of {len(ids)} tokens plus max_new_tokens={msg.max_new_tokens} exceeds the model "
                      f"context of {info.max_context}")
    bad = [t for t in ids + msg.stop_token_ids if t >= info.vocab_size]
    if bad:
        raise Invalid(f"token ids {bad[:5]} are outside the vocabulary of {info.vocab_size}")
