import pytest
from transformers import AutoTokenizer

from amusd_mq import models
from amusd_mq.text.chat import ChatError, ChatTemplate

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sort [3, 1, 2]."},
        {"role": "assistant", "content": "[1, 2, 3]"}, {"role": "user", "content": "Now descending, ünïcode."}]


def _tokenizer(template):
    tokenizer = models.tiny_tokenizer()
    tokenizer.chat_template = template
    return tokenizer


def test_a_chat_renders_as_transformers_renders_it(tiny_cache):
    tokenizer = AutoTokenizer.from_pretrained(models.resolve("tiny-verify", tiny_cache))
    expected = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert ChatTemplate.of(tokenizer).render(CHAT) == expected


def test_named_templates_serve_chats_with_the_default_one_and_its_special_tokens():
    template = "{{ eos_token }}{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}{{ eos_token }}"
    chat = ChatTemplate.of(_tokenizer({"tool_use": "tools", "default": template}))
    assert chat.render(CHAT[:2]) == "<|endoftext|>[system]Be brief.[user]Sort [3, 1, 2].<|endoftext|>"
    assert ChatTemplate.of(_tokenizer({"tool_use": "tools"})) is None  # no default for a plain chat


def test_a_model_without_a_template_has_none():
    assert ChatTemplate.of(_tokenizer(None)) is None


def test_messages_the_template_refuses_are_a_chat_error():
    template = ChatTemplate.of(_tokenizer(
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}ok"))
    assert template.render([{"role": "user", "content": "hi"}]) == "ok"
    with pytest.raises(ChatError, match="user first"):
        template.render([{"role": "assistant", "content": "hi"}])
    with pytest.raises(ChatError, match="role"):
        template.render([{"content": "hi"}])
