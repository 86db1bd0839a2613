"""Probe SmolLM2-135M-Instruct on the data of make_data.py under a few system prompts.

    python docs/own_data/make_data.py /tmp/own_data
    python docs/own_data/probe.py /tmp/own_data [--per-source 16] [--max-new-tokens 256]

Greedy decoding with transformers `generate` (one batch of --per-source problems per
source and prompt, left-padded, torch on one thread) on the first problems of each
source in DATA_DIR/test.jsonl. Responses are scored as rlpost's `math` reward component
scores them (rewards/components/math_answer.py: the final answer of
rewards/answers.py, checked by math-verify). Prints, per system prompt and source: the
accuracy, the mean response length in tokens (EOS not counted), the fraction cut at
max_new_tokens, and how many responses had no extractable answer, then one response per
prompt and source.

"none" sends no system message, so SmolLM2's chat template adds its default one
("You are a helpful AI assistant named SmolLM, trained by Hugging Face").
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from rlpost.model.load import smollm2_dir
from rlpost.rewards.answers import final_answer
from rlpost.rewards.base import Problem
from rlpost.rewards.components.math_answer import MathAnswer
from rlpost.tracking.eval_metrics import format_table

SYSTEM_PROMPTS = {
    "none": None,
    "answer-is": "Solve the problem step by step and end with: The answer is <number>.",
    "boxed": "Solve the problem step by step and put the final answer in \\boxed{}.",
}
SOURCES = ("gsm_symbolic", "basic_arithmetic")


def load_problems(path: Path, per_source: int) -> dict[str, list[dict]]:
    by_source: dict[str, list[dict]] = {s: [] for s in SOURCES}
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if len(by_source[row["data_source"]]) < per_source:
            by_source[row["data_source"]].append(row)
    return by_source


@torch.inference_mode()
def generate(model, tok, rows: list[dict], system: str | None, max_new_tokens: int):
    """Greedy responses to `rows` and their lengths in tokens (EOS not counted; a
    response without EOS has max_new_tokens tokens and was cut)."""
    chats = [([{"role": "system", "content": system}] if system else []) + row["prompt"] for row in rows]
    texts = [tok.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in chats]
    batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    out = model.generate(
        **batch,
        do_sample=False,
        max_new_tokens=max_new_tokens,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    new = out[:, batch["input_ids"].shape[1] :]
    lengths = []
    for ids in new.tolist():
        lengths.append(ids.index(tok.eos_token_id) if tok.eos_token_id in ids else len(ids))
    responses = [tok.decode(ids[:n], skip_special_tokens=True) for ids, n in zip(new.tolist(), lengths)]
    return responses, lengths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("--per-source", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    args = parser.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    torch.set_num_threads(1)
    model_dir = smollm2_dir()
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    reward = MathAnswer(MathAnswer.Args(), task=None)
    problems = load_problems(args.data_dir / "test.jsonl", args.per_source)
    print(f"model {model_dir}; {args.per_source} test problems per source; greedy decoding,")
    print(f"max_new_tokens {args.max_new_tokens}; torch threads {torch.get_num_threads()}")

    table: dict[tuple[str, str], dict[str, float]] = {}
    examples = []
    for name, system in SYSTEM_PROMPTS.items():
        every = []  # (correct, length, cut, no answer) over both sources
        for source in SOURCES:
            rows = problems[source]
            start = time.perf_counter()
            responses, lengths = generate(model, tok, rows, system, args.max_new_tokens)
            seconds = time.perf_counter() - start
            scored = []
            for row, response, n in zip(rows, responses, lengths):
                ok = reward(response, Problem(prompt=row["prompt"], answer=row["answer"], source=source))
                scored.append((ok, n, n >= args.max_new_tokens, final_answer(response) is None))
            every += scored
            table[(name, source)] = summary(scored, seconds)
            examples.append((name, source, rows[0]["answer"], responses[0], scored[0][0]))
        table[(name, "all")] = summary(every, None)
    print(format_table(table, digits=2, headers=("system prompt", "source")))
    print("columns: greedy = accuracy; tokens = mean response length (EOS not counted);")
    print("no_answer = fraction with no final answer (final_answer() is None);")
    print("truncated = fraction cut at max_new_tokens; seconds = wall time of the batch")
    for name, source, answer, response, ok in examples:
        print(f"\n--- {name} / {source} (gold {answer}, reward {ok:.0f}):\n{response[:400]}")


def summary(scored: list[tuple[float, int, bool, bool]], seconds: float | None) -> dict[str, float]:
    n = len(scored)
    row = {
        "greedy": sum(s[0] for s in scored) / n,
        "tokens": sum(s[1] for s in scored) / n,
        "no_answer": sum(s[3] for s in scored) / n,
        "problems": n,
        "truncated": sum(s[2] for s in scored) / n,
    }
    if seconds is not None:
        row["seconds"] = seconds
    return row


if __name__ == "__main__":
    main()
