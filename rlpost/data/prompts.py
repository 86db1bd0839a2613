"""A problem's text -> the prompt a job shows the model -> its token ids.

One rendering for every job: the rollout workers generate from `encode_prompt`'s ids,
and the offline data formats hold `prompt_record`'s form, which the offline loaders
tokenize to the same ids (so `rlpost cdpo` trains on prompts exactly as they were
sampled).
"""

from __future__ import annotations

from rlpost.config.sections import TaskConfig


def prompt_record(tokenizer, text: str, task: TaskConfig) -> str | list[dict[str, str]]:
    """A problem as a prompt of the offline data formats (rlpost/data/datasets.py), which
    tokenize it as `encode_prompt` does: with the tokenizer's chat template
    (task.chat_template on, or auto and the tokenizer has one) a user message after
    task.system_prompt as a system message; else text, the system prompt and a blank line
    before the problem."""
    use_template = task.chat_template == "on" or (
        task.chat_template == "auto" and bool(getattr(tokenizer, "chat_template", None))
    )
    if use_template:
        messages = [{"role": "user", "content": text}]
        if task.system_prompt is not None:
            messages.insert(0, {"role": "system", "content": task.system_prompt})
        return messages
    return text if task.system_prompt is None else f"{task.system_prompt}\n\n{text}"


def encode_prompt(tokenizer, text: str, task: TaskConfig) -> list[int]:
    """Token ids of a problem's `prompt_record`: a conversation rendered by the chat
    template with the assistant's generation prompt, or BOS and the text."""
    prompt = prompt_record(tokenizer, text, task)
    if isinstance(prompt, list):
        rendered = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        # the template writes its own special tokens (BOS included, where it has one)
        return tokenizer.encode(rendered, add_special_tokens=False)
    bos = tokenizer.bos_token_id
    return ([bos] if bos is not None else []) + tokenizer.encode(prompt, add_special_tokens=False)
