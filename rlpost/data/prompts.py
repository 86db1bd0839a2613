"""A problem's prompt -> the prompt a job shows the model -> its token ids.

One rendering for every job: the rollout workers generate from `encode_prompt`'s ids,
and the offline data formats hold `prompt_record`'s form, which the offline loaders
tokenize to the same ids (so `rlpost cdpo` trains on prompts exactly as they were
sampled).

A prompt is a problem's text, or a conversation (a list of {"role", "content"} messages,
as prompt files hold them). Text is shown as a user message with the chat template, or
as plain text without one. A conversation needs the chat template; task.system_prompt is
put before it as a system message only when it has no system message of its own (the
row's own instructions win over the run's).
"""

from __future__ import annotations

import json
from pathlib import Path

from rlpost.config.sections import TaskConfig
from rlpost.errors import ConfigError

Prompt = str | list[dict[str, str]]


def uses_template(tokenizer, task: TaskConfig) -> bool:
    """Whether prompts are rendered with the chat template: task.chat_template on, or auto
    and the tokenizer has one."""
    return task.chat_template == "on" or (
        task.chat_template == "auto" and bool(getattr(tokenizer, "chat_template", None))
    )


def template_missing(tokenizer, task: TaskConfig) -> str | None:
    """Why a conversation cannot be rendered with this tokenizer and task (None: it can)."""
    if task.chat_template == "off":
        return "task.chat_template is off"
    if not getattr(tokenizer, "chat_template", None):
        return "the tokenizer has no chat template"
    return None


def prompt_record(tokenizer, prompt: Prompt, task: TaskConfig) -> Prompt:
    """A problem as a prompt of the offline data formats (rlpost/data/datasets.py), which
    tokenize it as `encode_prompt` does: with the tokenizer's chat template
    (task.chat_template on, or auto and the tokenizer has one) a user message after
    task.system_prompt as a system message; else text, the system prompt and a blank line
    before the problem. A conversation stays one, with task.system_prompt first where it
    has no system message (ConfigError where the template is off or missing)."""
    if isinstance(prompt, list):
        if (why := template_missing(tokenizer, task)) is not None:
            raise ConfigError(f"a conversational prompt needs the chat template: {why}")
        messages = list(prompt)
        if task.system_prompt is not None and not any(m["role"] == "system" for m in messages):
            messages.insert(0, {"role": "system", "content": task.system_prompt})
        return messages
    if uses_template(tokenizer, task):
        messages = [{"role": "user", "content": prompt}]
        if task.system_prompt is not None:
            messages.insert(0, {"role": "system", "content": task.system_prompt})
        return messages
    return prompt if task.system_prompt is None else f"{task.system_prompt}\n\n{prompt}"


def _rendered(tokenizer, prompts: list[Prompt], task: TaskConfig) -> tuple[list[int], list[str]]:
    """Per prompt, how many ids come before its text (BOS) and the text to encode."""
    records = [prompt_record(tokenizer, p, task) for p in prompts]
    talks = [r for r in records if isinstance(r, list)]
    # one call renders them all: the template is compiled once, not once per prompt
    rendered = iter(
        tokenizer.apply_chat_template(talks, add_generation_prompt=True, tokenize=False) if talks else ()
    )
    bos = int(tokenizer.bos_token_id is not None)
    # the template writes its own special tokens (BOS included, where it has one)
    return [0 if isinstance(r, list) else bos for r in records], [
        next(rendered) if isinstance(r, list) else r for r in records
    ]


def encode_prompt(tokenizer, prompt: Prompt, task: TaskConfig) -> list[int]:
    """Token ids of a problem's `prompt_record`: a conversation rendered by the chat
    template with the assistant's generation prompt, or BOS and the text."""
    (prefix,), (text,) = _rendered(tokenizer, [prompt], task)
    return [tokenizer.bos_token_id] * prefix + tokenizer.encode(text, add_special_tokens=False)


def prompt_lengths(tokenizer, prompts: list[Prompt], task: TaskConfig) -> list[int]:
    """len(encode_prompt(...)) of each prompt, rendered and tokenized as one batch."""
    if not prompts:
        return []
    prefixes, texts = _rendered(tokenizer, prompts, task)
    counts = []
    # a fast tokenizer's encoding of a text holds its tokens' strings and offsets too
    # (~100 bytes a token): 256 texts at a time bound that
    for i in range(0, len(texts), 256):
        out = tokenizer(texts[i : i + 256], add_special_tokens=False, return_attention_mask=False)
        counts += map(len, out["input_ids"])
    return [p + n for p, n in zip(prefixes, counts)]


TEMPLATE_ALLOWANCE = 1024  # characters a chat template may add around a prompt


def model_context(tokenizer) -> int | None:
    """The positions of the model whose directory the tokenizer was loaded from (its
    config.json's max_position_embeddings), None when unknown."""
    config = Path(getattr(tokenizer, "name_or_path", "") or "") / "config.json"
    try:
        value = json.loads(config.read_text()).get("max_position_embeddings")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) and value > 0 else None


def beyond_context(tokenizer, prompts: list[Prompt], task: TaskConfig, context: int) -> dict[int, int]:
    """{index: tokens} of the prompts that leave no position of `context` for a response.
    Only a prompt that could reach it is tokenized (a token takes at least one UTF-8 byte,
    a character at most 4; `TEMPLATE_ALLOWANCE` for the chat template), so ordinary
    prompts cost nothing."""
    extra = len(task.system_prompt or "") + TEMPLATE_ALLOWANCE

    def chars(p: Prompt) -> int:
        return len(p) if isinstance(p, str) else sum(len(m["content"]) for m in p)

    near = [i for i, p in enumerate(prompts) if 4 * (extra + chars(p)) >= context]
    lengths = prompt_lengths(tokenizer, [prompts[i] for i in near], task)
    return {i: n for i, n in zip(near, lengths) if n >= context}
