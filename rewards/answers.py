"""Pulling the final answer (or program) out of a model's response."""

from __future__ import annotations

import re

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_ANSWER_IS = re.compile(r"answer\s*(?:is|:)\s*:?\s*(.+)", re.IGNORECASE)
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?|-?\.\d+")
_CODE_BLOCK = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


def answer_tag(text: str) -> str | None:
    """The content of the last <answer>...</answer>, stripped."""
    found = _ANSWER_TAG.findall(text)
    return found[-1].strip() if found else None


def last_boxed(text: str) -> str | None:
    r"""The content of the last \boxed{...} (nested braces allowed)."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, begin = 0, start + len("\\boxed{")
    for i in range(begin - 1, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[begin:i].strip()
    return None  # unbalanced


def final_answer(text: str) -> str | None:
    r"""The answer a response commits to: the content of its last <answer> tags (their
    \boxed{...} if any); without tags, the last \boxed{...}, else what follows the
    last "answer is"/"answer:", else the last number."""
    tagged = answer_tag(text)
    if tagged is not None:
        boxed = last_boxed(tagged)
        return (boxed if boxed is not None else tagged) or None
    if (boxed := last_boxed(text)) is not None:
        return boxed or None
    found = _ANSWER_IS.findall(text)
    if found and (line := found[-1].strip().rstrip(".").strip("$ ")):
        return line
    numbers = _NUMBER.findall(text)
    return numbers[-1].replace(",", "") if numbers else None


def code_block(text: str) -> str:
    """The last fenced Python (or untagged) code block; the whole response if none."""
    found = _CODE_BLOCK.findall(text)
    return found[-1] if found else text
