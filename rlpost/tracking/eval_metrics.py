"""Evaluation metrics over n sampled responses per problem, as pure functions.

Per problem: `problem_metrics` turns the n samples' correctness (and extracted answers)
into greedy accuracy, mean@n, pass@k and maj@k; `aggregate` averages those rows over the
problems of an eval set; `format_table` prints one line per (eval set, source).

Row keys: "greedy" (the greedy response is correct), f"mean@{n}", f"pass@{k}",
f"maj@{k}", "truncated" (the fraction of the n samples cut at max_new_tokens); aggregate
adds "problems" (how many rows it averaged).

Only the standard library: callers hand in plain lists.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence


def _check(n: int, c: int, k: int | None) -> None:
    if n < 1 or not 0 <= c <= n:
        raise ValueError(f"need n >= 1 and 0 <= c <= n, got n={n}, c={c}")
    if k is not None and not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got k={k}, n={n}")


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimate of pass@k from n samples of which c are correct (Chen et al.
    2021, "Evaluating Large Language Models Trained on Code"): the probability that at
    least one of k samples drawn without replacement from the n is correct,
    1 - C(n-c, k) / C(n, k).

    Computed in product form, 1 - prod_{i=n-c+1}^{n} (1 - k/i), which never forms the
    (huge) binomial coefficients. For n=5, c=2: k=1..5 give 0.4, 0.7, 0.9, 1.0, 1.0.
    """
    _check(n, c, k)
    if n - c < k:  # every draw of k holds a correct sample
        return 1.0
    miss = 1.0  # C(n-c, k) / C(n, k)
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def mean_at_k(n: int, c: int, k: int | None = None) -> float:
    """Mean correctness of the n samples, c / n.

    This is the unbiased estimate of the expected accuracy of one sample (pass@1); it
    is the same for every k <= n (the mean over all k-subsets of their mean accuracy is
    c / n), so k is only checked, never used.
    """
    _check(n, c, k)
    return c / n


def maj_at_k(answers: Sequence[str | None], correct: Sequence[bool], k: int) -> float:
    """Majority vote over the FIRST k samples (not an unbiased estimate over k-subsets).

    The winning answer is the most frequent extracted answer among the first k samples;
    None answers (nothing extracted) never win; a tie goes to the answer seen first.
    Returns 1.0 if a sample among the first k with the winning answer is correct, else
    0.0, and 0.0 when all k answers are None.
    """
    if len(answers) != len(correct):
        raise ValueError(f"{len(answers)} answers but {len(correct)} correctness flags")
    _check(len(answers), 0, k)
    votes = Counter(a for a in answers[:k] if a is not None)  # insertion order: first seen
    if not votes:
        return 0.0
    top = max(votes.values())
    winner = next(a for a, count in votes.items() if count == top)
    return float(any(ok for a, ok in zip(answers[:k], correct[:k]) if a == winner))


def problem_metrics(
    correct: Sequence[bool],
    answers: Sequence[str | None],
    ks: Sequence[int],
    *,
    greedy: bool | None = None,
    truncated: Sequence[bool] | None = None,
) -> dict[str, float]:
    """One problem's metrics from its n samples: mean@n, pass@k and maj@k for each k in
    ks (every k must be <= n); "greedy" if the greedy response's correctness is given,
    "truncated" (fraction of samples cut at the length limit) if flags are given."""
    n, c = len(correct), sum(bool(x) for x in correct)
    row: dict[str, float] = {}
    if greedy is not None:
        row["greedy"] = float(greedy)
    row[f"mean@{n}"] = mean_at_k(n, c)
    for k in sorted(set(ks)):
        row[f"pass@{k}"] = pass_at_k(n, c, k)
    for k in sorted(set(ks)):
        row[f"maj@{k}"] = maj_at_k(answers, correct, k)
    if truncated is not None:
        if len(truncated) != n:
            raise ValueError(f"{len(truncated)} truncation flags for {n} samples")
        row["truncated"] = sum(bool(x) for x in truncated) / n
    return row


def aggregate(rows: Sequence[dict[str, float]]) -> dict[str, float]:
    """The mean of each metric over problems, plus "problems": how many. All rows must
    have the same keys (the same n and ks), so no mean silently covers a subset."""
    if not rows:
        return {"problems": 0}
    keys = list(rows[0])
    for row in rows[1:]:
        if set(row) != set(keys):
            raise ValueError(f"rows with different metrics: {sorted(keys)} vs {sorted(row)}")
    out: dict[str, float] = {key: sum(row[key] for row in rows) / len(rows) for key in keys}
    out["problems"] = len(rows)
    return out


_AT = re.compile(r"(mean|pass|maj)@(\d+)$")
_FAMILY = {"mean": 1, "pass": 2, "maj": 3}


def _column_order(key: str) -> tuple[int, int, str]:
    if key == "greedy":
        return (0, 0, key)
    if m := _AT.match(key):
        return (_FAMILY[m.group(1)], int(m.group(2)), key)
    if key == "problems":
        return (5, 0, key)
    if key == "truncated":
        return (6, 0, key)
    return (4, 0, key)  # anything else: after maj@k, before the counts


def format_table(
    rows: dict[tuple[str, str], dict[str, float]],
    *,
    digits: int = 3,
    headers: tuple[str, str] = ("eval set", "source"),
) -> str:
    """A console table, one line per (eval set, source) in the order given.

    Columns: the two names (left-aligned), then greedy, mean@n, pass@k (by k), maj@k (by
    k), any other metric, problems and truncated (right-aligned; `digits` decimals, the
    problem count as an integer, "-" where a row lacks a metric). A header line and a
    dashed rule come first; lines carry no trailing spaces.
    """
    metrics = sorted({key for row in rows.values() for key in row}, key=_column_order)
    table = [[*headers, *metrics]]
    for (eval_set, source), row in rows.items():
        cells = [eval_set, source]
        for key in metrics:
            value = row.get(key)
            if value is None:
                cells.append("-")
            elif key == "problems":
                cells.append(str(int(value)))
            else:
                cells.append(f"{value:.{digits}f}")
        table.append(cells)
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    table.insert(1, ["-" * w for w in widths])

    def render(cells: list[str]) -> str:
        parts = [c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return "  ".join(parts).rstrip()

    return "\n".join(render(line) for line in table)
