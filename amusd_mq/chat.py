"""Chat prompts: messages rendered with the verify model's own chat template, as transformers renders them
(and so as vLLM and SGLang do), so that a chat request here is the prompt the model was trained on."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from jinja2 import TemplateError
from transformers.utils.chat_template_utils import render_jinja_template

SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")  # what templates may refer to by name


class ChatError(ValueError):
    """Messages the template refuses (a role out of order, say): the request's fault, not the server's."""


@dataclass(frozen=True)
class ChatTemplate:
    source: str
    special: dict[str, str]

    @classmethod
    def load(cls, model_dir: Path) -> ChatTemplate | None:
        """The template saved with a model (chat_template.jinja, or tokenizer_config.json's chat_template), if any."""
        config_file = model_dir / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.exists() else {}
        source = config.get("chat_template")
        if isinstance(source, list):  # named templates: the default one serves plain chats
            source = {t.get("name"): t.get("template") for t in source}.get("default")
        if (model_dir / "chat_template.jinja").exists():
            source = (model_dir / "chat_template.jinja").read_text()
        if not source:
            return None
        special = {name: value.get("content") if isinstance(value, dict) else value
                   for name in SPECIAL_TOKENS if (value := config.get(name))}
        return cls(source, special)

    def render(self, messages: list[dict[str, str]]) -> str:
        """The prompt text for a chat, ending where the assistant's reply begins."""
        for i, msg in enumerate(messages):
            if "role" not in msg or "content" not in msg:
                raise ChatError(f"messages[{i}] needs a 'role' and a 'content'")
        try:
            (rendered,), _ = render_jinja_template([messages], chat_template=self.source, add_generation_prompt=True,
                                                   **self.special)
        except TemplateError as exc:
            raise ChatError(f"the chat template refused these messages: {exc}") from None
        return rendered
