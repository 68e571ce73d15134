"""Chat prompts: messages rendered with the verify model's own chat template by transformers' own
`apply_chat_template` (as vLLM and SGLang render them), so that a chat request here is the prompt the model was
trained on."""
from __future__ import annotations

from dataclasses import dataclass

from jinja2 import TemplateError


class ChatError(ValueError):
    """Messages the template refuses (a role out of order, say): the request's fault, not the server's."""


@dataclass(frozen=True)
class ChatTemplate:
    tokenizer: object  # transformers' tokenizer of the model, which holds the template and its special tokens

    @classmethod
    def of(cls, tokenizer) -> ChatTemplate | None:
        """The template a tokenizer was loaded with (a named set serves plain chats with its default), if any."""
        try:
            return cls(tokenizer) if tokenizer.chat_template and tokenizer.get_chat_template() else None
        except ValueError:  # named templates without a default
            return None

    def render(self, messages: list[dict[str, str]]) -> str:
        """The prompt text for a chat, ending where the assistant's reply begins."""
        for i, msg in enumerate(messages):
            if "role" not in msg or "content" not in msg:
                raise ChatError(f"messages[{i}] needs a 'role' and a 'content'")
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except TemplateError as exc:
            raise ChatError(f"the chat template refused these messages: {exc}") from None
