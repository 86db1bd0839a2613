"""Scored trajectories as offline training data (cDPO's sample stage): supervised examples
of the correct and of the incorrect ones, and (correct, incorrect) preference pairs, as rows
of the formats rlpost/data/datasets.py reads.

A trajectory is a dict with at least `problem` (its index), `response` (text) and
`correct`.
"""

from __future__ import annotations


def usable(sample: dict) -> bool:
    """Whether a trajectory can be training data: the data formats have no empty response
    (a model that stops at once); those are counted, not trained on."""
    return bool(sample["response"].strip())


def make_pairs(samples: list[dict], per_problem: int) -> list[dict]:
    """(correct, incorrect) pairs of each problem that has both: each distinct incorrect
    response, at most `per_problem` of them, with the distinct correct ones in turn."""
    by_problem: dict[int, tuple[list[dict], list[dict]]] = {}
    for s in filter(usable, samples):
        correct, incorrect = by_problem.setdefault(s["problem"], ([], []))
        kind = correct if s["correct"] else incorrect
        if all(o["response"] != s["response"] for o in kind):
            kind.append(s)
    pairs = []
    for problem, (correct, incorrect) in by_problem.items():
        if correct:
            pairs += [
                {
                    "problem": problem,
                    "chosen": correct[k % len(correct)]["response"],
                    "rejected": rejected["response"],
                }
                for k, rejected in enumerate(incorrect[:per_problem])
            ]
    return pairs


def training_rows(samples: list[dict], pairs: list[dict], prompts: list) -> dict[str, list[dict]]:
    """The rows of `positives` and `negatives` (SFT examples of the usable correct and
    incorrect samples) and of `pairs_unweighted` (the pairs of `make_pairs`). Problem i's
    prompt is `prompts[i]`, text or messages; the responses take the same form."""

    def response(text: str) -> str | list[dict[str, str]]:
        return [{"role": "assistant", "content": text}] if isinstance(prompts[0], list) else text

    def examples(correct: bool) -> list[dict]:
        return [
            {"prompt": prompts[s["problem"]], "completion": response(s["response"])}
            for s in samples
            if s["correct"] == correct and usable(s)
        ]

    return {
        "positives": examples(True),
        "negatives": examples(False),
        "pairs_unweighted": [
            {
                **p,
                "prompt": prompts[p["problem"]],
                "chosen": response(p["chosen"]),
                "rejected": response(p["rejected"]),
            }
            for p in pairs
        ],
    }
