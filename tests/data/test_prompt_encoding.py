"""Prompts through the tokenizer's chat template (task.chat_template) and the system prompt."""

from __future__ import annotations

import string

import pytest

from rlpost.config.sections import TaskConfig
from rlpost.data.prompts import encode_prompt
from rlpost.errors import ConfigError
from rlpost.jobs.preflight import load_config
from rlpost.model.load import char_tokenizer

# a ChatML-like template in the style of SmolLM2's (special tokens written as text)
TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}:{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant:{% endif %}"
)


def tokenizer(template: str | None = None):
    tok = char_tokenizer(string.printable)
    if template is not None:
        tok.chat_template = template
    return tok


def test_without_a_template_the_prompt_is_bos_and_the_text():
    tok = tokenizer()
    ids = encode_prompt(tok, "1+2=", TaskConfig())
    assert ids == [tok.bos_token_id] + tok.encode("1+2=", add_special_tokens=False)
    # the template switch cannot invent a template, and 'off' is the same as none
    assert encode_prompt(tok, "1+2=", TaskConfig(chat_template="off")) == ids
    with pytest.raises(ValueError):  # transformers: no chat template
        encode_prompt(tok, "1+2=", TaskConfig(chat_template="on"))


def test_without_a_template_the_system_prompt_comes_first():
    tok = tokenizer()
    ids = encode_prompt(tok, "1+2=", TaskConfig(system_prompt="Add."))
    assert ids == [tok.bos_token_id] + tok.encode("Add.\n\n1+2=", add_special_tokens=False)


def test_a_template_renders_a_user_message_and_the_generation_prompt():
    tok = tokenizer(TEMPLATE)
    ids = encode_prompt(tok, "1+2=", TaskConfig())
    assert tok.decode(ids) == "<s>user:1+2=</s><s>assistant:"
    # the template's <s> is the BOS token itself, and no second BOS is added
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 2
    with_system = encode_prompt(tok, "1+2=", TaskConfig(system_prompt="Add."))
    assert tok.decode(with_system) == "<s>system:Add.</s><s>user:1+2=</s><s>assistant:"
    off = encode_prompt(tok, "1+2=", TaskConfig(chat_template="off"))
    assert off == [tok.bos_token_id] + tok.encode("1+2=", add_special_tokens=False)


def test_unknown_template_switch_is_a_config_error():
    with pytest.raises(ConfigError, match="task.chat_template"):
        load_config(None, ["task.chat_template=sometimes"])


@pytest.mark.parametrize("template", [None, TEMPLATE])
@pytest.mark.parametrize("system", [None, "Add."])
def test_offline_records_tokenize_as_the_rollout_prompts(tmp_path, template, system):
    """`rlpost cdpo` writes sampled trajectories as `prompt_record`s for `rlpost sft` /
    `rlpost dpo`: their loaders must give back the prompt ids the rollout workers saw."""
    import json

    from rlpost.data.datasets import load_preference_pairs
    from rlpost.data.prompts import prompt_record

    tok, task = tokenizer(template), TaskConfig(system_prompt=system)
    prompt = prompt_record(tok, "1+2=", task)
    side = (lambda text: [{"role": "assistant", "content": text}]) if template else (lambda text: text)
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": prompt, "chosen": side("3"), "rejected": side("4")}) + "\n")
    (pair,), _ = load_preference_pairs(path, tok, strict=True)
    assert pair.prompt_ids == encode_prompt(tok, "1+2=", task)
    assert tok.decode(pair.rejected_ids).startswith("4")


def test_a_conversation_gets_the_system_prompt_only_without_its_own():
    tok, task = tokenizer(TEMPLATE), TaskConfig(system_prompt="Add.")
    talk = [{"role": "user", "content": "1+2="}]
    assert encode_prompt(tok, talk, task) == encode_prompt(tok, "1+2=", task)
    own = [{"role": "system", "content": "Sum."}, *talk]
    assert tok.decode(encode_prompt(tok, own, task)) == "<s>system:Sum.</s><s>user:1+2=</s><s>assistant:"
    assert tok.decode(encode_prompt(tok, talk, TaskConfig())) == "<s>user:1+2=</s><s>assistant:"
    with pytest.raises(ConfigError, match="the tokenizer has no chat template"):
        encode_prompt(tokenizer(), talk, TaskConfig())
    with pytest.raises(ConfigError, match="task.chat_template is off"):
        encode_prompt(tok, talk, TaskConfig(chat_template="off"))


@pytest.mark.parametrize("template", [None, TEMPLATE])
def test_prompt_lengths_are_the_encoded_lengths(template):
    from rlpost.data.prompts import prompt_lengths

    tok, task = tokenizer(template), TaskConfig(system_prompt="Add.")
    prompts = ["1+2=", "", "a longer problem: 12*34="]
    if template:
        prompts.insert(1, [{"role": "system", "content": "S"}, {"role": "user", "content": "x"}])
    assert prompt_lengths(tok, prompts, task) == [len(encode_prompt(tok, p, task)) for p in prompts]
    assert prompt_lengths(tok, [], task) == []
