"""A GSM-style math data set from reasoning-gym, in a TRL/verl-like JSONL row format.

    python docs/own_data/make_data.py OUT_DIR [--train N] [--test M] [--seed S]

writes OUT_DIR/train.jsonl and OUT_DIR/test.jsonl, one row a line:

    {"data_source": "gsm_symbolic" | "basic_arithmetic",
     "prompt": [{"role": "user", "content": QUESTION}],
     "answer": ANSWER,            # a string, exactly as reasoning-gym gives it
     "extra_info": {"index": I}}  # the row's position in its file

Half the rows of each file come from each source (gsm_symbolic takes the odd one),
shuffled with a fixed seed.

- gsm_symbolic: grade-school word problems (GSM8K templates with new numbers). Their
  answers are plain numbers: integers, and now and then a decimal ("9281.25", money).
- basic_arithmetic: 2-3 terms of 1-2 digits, + - * / (exact division), suited to a
  135M model. It keeps reasoning-gym's default generator (allow_parentheses=True),
  which evaluates the expression it prints; its "simple" generator
  (allow_parentheses=False) computes left to right, so "3 + 2 * 3" gets the answer 15.
  Every answer is still checked against the expression's exact value.

Train and test share no question: reasoning-gym seeds item i with Random(seed + i), so
seeds S and S + 1 would give the same items shifted by one; the test set uses seed
S + TEST_SEED_OFFSET, and any question already in train (or earlier in the same
file) is dropped and replaced by the next item.

Needs `reasoning-gym` (pip install reasoning-gym).
"""

from __future__ import annotations

import argparse
import ast
import json
import operator
import random
import re
from collections import Counter
from fractions import Fraction
from pathlib import Path

TEST_SEED_OFFSET = 1_000_000
SOURCES: dict[str, dict] = {
    "gsm_symbolic": {},
    "basic_arithmetic": dict(
        min_terms=2,
        max_terms=3,
        min_digits=1,
        max_digits=2,
        operators=("+", "-", "*", "/"),
        allow_parentheses=True,  # the generator that evaluates what it prints (see above)
        allow_negation=False,  # no "-( ... )"; single terms may still be negative
    ),
}
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
_PLAIN_NUMBER = re.compile(r"-?\d+(\.\d+)?")


def exact_value(expression: str) -> Fraction:
    """The exact value of an arithmetic expression of integers, + - * / and parentheses."""

    def walk(node: ast.AST) -> Fraction:
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            return -walk(node.operand) if isinstance(node.op, ast.USub) else walk(node.operand)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return Fraction(node.value)
        raise ValueError(f"not plain arithmetic: {expression!r}")

    return walk(ast.parse(expression, mode="eval").body)


def answer_is_right(source: str, item: dict) -> bool:
    if not _PLAIN_NUMBER.fullmatch(item["answer"]):
        return False
    if source == "basic_arithmetic":
        try:
            return exact_value(item["metadata"]["expression"]) == Fraction(item["answer"])
        except (ZeroDivisionError, ValueError):
            return False
    return True


def draw(source: str, count: int, seed: int, taken: set[str], stats: Counter) -> list[dict]:
    """`count` items of `source` whose questions are not in `taken` (which grows)."""
    import reasoning_gym

    size = 2 * count + 100
    while True:  # grow the virtual data set until enough distinct questions turn up
        items = []
        data = reasoning_gym.create_dataset(source, size=size, seed=seed, **SOURCES[source])
        seen = set(taken)
        skipped = Counter()
        for item in data:
            if item["question"] in seen:
                skipped["repeated question"] += 1
            elif not answer_is_right(source, item):
                skipped["answer not a checked plain number"] += 1
            else:
                seen.add(item["question"])
                items.append(item)
                if len(items) == count:
                    taken |= seen
                    for why, n in skipped.items():
                        stats[f"{source}: dropped ({why})"] += n
                    return items
        if size > 100 * count + 10_000:
            raise RuntimeError(f"{source}: only {len(items)} distinct questions, {count} wanted")
        size *= 2


def make_split(n_rows: int, seed: int, taken: set[str], stats: Counter) -> list[dict]:
    n_arith = n_rows // 2
    counts = {"gsm_symbolic": n_rows - n_arith, "basic_arithmetic": n_arith}
    rows = []
    for source, count in counts.items():
        for item in draw(source, count, seed, taken, stats):
            rows.append({"data_source": source, "question": item["question"], "answer": item["answer"]})
    random.Random(seed).shuffle(rows)
    return [
        {
            "data_source": row["data_source"],
            "prompt": [{"role": "user", "content": row["question"]}],
            "answer": row["answer"],
            "extra_info": {"index": i},
        }
        for i, row in enumerate(rows)
    ]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def describe(name: str, rows: list[dict]) -> None:
    print(f"{name}: {len(rows)} rows")
    for source in SOURCES:
        answers = [r["answer"] for r in rows if r["data_source"] == source]
        ints = sum(bool(re.fullmatch(r"-?\d+", a)) for a in answers)
        negative = sum(a.startswith("-") for a in answers)
        print(
            f"  {source:<17} {len(answers):>6} rows; answers: {ints} integers, "
            f"{len(answers) - ints} decimals, {negative} negative"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--train", type=int, default=2000, help="training rows (default 2000)")
    parser.add_argument("--test", type=int, default=200, help="test rows (default 200)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    taken: set[str] = set()
    stats: Counter = Counter()
    train = make_split(args.train, args.seed, taken, stats)
    test = make_split(args.test, args.seed + TEST_SEED_OFFSET, taken, stats)
    train_questions = {r["prompt"][0]["content"] for r in train}
    assert not train_questions & {r["prompt"][0]["content"] for r in test}

    args.out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out_dir / "train.jsonl", train)
    write_jsonl(args.out_dir / "test.jsonl", test)
    describe(f"{args.out_dir / 'train.jsonl'} (seed {args.seed})", train)
    describe(f"{args.out_dir / 'test.jsonl'} (seed {args.seed + TEST_SEED_OFFSET})", test)
    for what, n in sorted(stats.items()):
        print(f"  {what}: {n}")


if __name__ == "__main__":
    main()
