import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from amusd_mq import models
from amusd_mq.chat import ChatError, ChatTemplate

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sort [3, 1, 2]."},
        {"role": "assistant", "content": "[1, 2, 3]"}, {"role": "user", "content": "Now descending, ünïcode."}]


def test_a_chat_renders_as_transformers_renders_it(tiny_cache):
    path = models.resolve("tiny-verify", tiny_cache)
    expected = AutoTokenizer.from_pretrained(path).apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert ChatTemplate.load(Path(path)).render(CHAT) == expected


def test_templates_in_the_tokenizer_config_and_their_special_tokens_are_used(tmp_path):
    template = "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}{{ eos_token }}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": template}],
        "bos_token": {"content": "<s>"}, "eos_token": "</s>"}))
    assert ChatTemplate.load(tmp_path).render(CHAT[:2]) == "<s>[system]Be brief.[user]Sort [3, 1, 2].</s>"


def test_a_model_without_a_template_has_none(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    assert ChatTemplate.load(tmp_path) is None


def test_messages_the_template_refuses_are_a_chat_error(tmp_path):
    (tmp_path / "chat_template.jinja").write_text(
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}ok")
    template = ChatTemplate.load(tmp_path)
    assert template.render([{"role": "user", "content": "hi"}]) == "ok"
    with pytest.raises(ChatError, match="user first"):
        template.render([{"role": "assistant", "content": "hi"}])
    with pytest.raises(ChatError, match="role"):
        template.render([{"content": "hi"}])
