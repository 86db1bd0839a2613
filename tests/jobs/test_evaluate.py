"""The evaluator's bookkeeping, against a scripted session: which completions it asks for, how
it scores them per set and source, and what it writes."""

from __future__ import annotations

import json

import pytest

from rlpost.config.data import EvalConfig
from rlpost.config.sections import RolloutConfig
from rlpost.engines.base import Completion
from rlpost.jobs.evaluate import EvalSet, Evaluator
from rlpost.rewards import Problem
from rlpost.rewards.scoring.pool import RewardResult


class ScriptedSession:
    """Completions are the text of a token id list; a completion is correct when it ends in
    the problem's answer. `texts[(prompt, temperature == 0)]` scripts what comes back."""

    def __init__(self, texts):
        self.texts, self.calls, self.lines = texts, [], []
        self.tracker = self

    def print_line(self, text):
        self.lines.append(text)

    def generate(self, problems, n, temperature, seed, rule=None, top_p=None):
        self.calls.append((len(problems), n, temperature, seed, top_p))
        out = []
        for p in problems:
            texts = self.texts[(p.prompt, temperature == 0)]
            out.append(
                [
                    Completion(ids=[ord(c) for c in t], logprobs=[0.0] * len(t), truncated=t.endswith("…"))
                    for t in (texts * n)[:n]
                ]
            )
        return out

    def decode(self, responses):
        return ["".join(map(chr, r)) for r in responses]

    def score_texts(self, texts, lengths, problems):
        correct = [t.rstrip("…").endswith(p.answer) for t, p in zip(texts, problems)]
        return RewardResult([float(c) for c in correct], {}, {}, None, [p.source for p in problems], correct)

    def worker_compute_times(self):
        return {}


def test_per_source_metrics_and_generations(tmp_path):
    a = [
        Problem("p1", "3", source="gsm"),
        Problem("p2", "5", source="gsm"),
        Problem("p3", "7", source="arith"),
    ]
    b = [Problem("q1", "1", source="gsm")]
    texts = {
        ("p1", True): ["so 3"],
        ("p1", False): ["3", "4", "3", "x…", "4"],  # 2 of 5: pass@k = .4 .7 .9 1 1
        ("p2", True): ["6"],
        ("p2", False): ["5", "5", "5", "5", "5"],
        ("p3", True): ["7"],
        ("p3", False): ["1", "2", "2", "9", "9"],
        ("q1", True): ["1"],
        ("q1", False): ["1", "0", "0", "0", "0"],
    }
    session = ScriptedSession(texts)
    cfg = EvalConfig(n=5, temperature=0.5, top_p=0.9)
    metrics = Evaluator(session, [EvalSet("test", a), EvalSet("other", b)], cfg, RolloutConfig(), seed=1).run(
        tmp_path / "eval" / "gen.jsonl"
    )
    # greedy then sampled for each set; the sampled at eval.temperature / eval.top_p
    assert [c[1:3] for c in session.calls] == [(1, 0.0), (5, 0.5), (1, 0.0), (5, 0.5)]
    assert session.calls[1][4] == 0.9 and session.calls[0][3] == session.calls[1][3] != session.calls[2][3]
    assert metrics["eval/accuracy_greedy"] == pytest.approx(3 / 4)
    assert metrics["eval/accuracy_sampled"] == pytest.approx((2 + 5 + 0 + 1) / 20)
    assert metrics["eval/test/gsm/greedy"] == pytest.approx(0.5)
    assert metrics["eval/test/gsm/mean@5"] == pytest.approx((0.4 + 1.0) / 2)
    assert metrics["eval/test/gsm/pass@2"] == pytest.approx((0.7 + 1.0) / 2)
    assert metrics["eval/test/gsm/pass@4"] == pytest.approx(1.0)
    assert metrics["eval/test/arith/pass@5"] == 0.0 and metrics["eval/test/arith/greedy"] == 1.0
    # maj@5 of p1: answers 3, 4, 3, None, 4 -> 3 (seen first among the tied) is right
    assert metrics["eval/test/gsm/maj@5"] == pytest.approx(1.0)
    assert metrics["eval/other/gsm/maj@4"] == 0.0  # 1, 0, 0, 0 -> 0
    assert metrics["eval/test/gsm/truncated"] == pytest.approx((1 / 5 + 0) / 2)  # of the sampled

    rows = [json.loads(line) for line in (tmp_path / "eval" / "gen.jsonl").read_text().splitlines()]
    assert len(rows) == 4 * 6
    first = rows[:6]
    assert [r["mode"] for r in first] == ["greedy"] + ["sample"] * 5
    assert [r["response"] for r in first] == ["so 3", "3", "4", "3", "x…", "4"]
    assert [r["correct"] for r in first] == [True, True, False, True, False, False]
    assert first[0]["extracted"] == "3" and first[4]["extracted"] is None and first[4]["truncated"]
    assert any(line.startswith("eval test: 3/3 problems") for line in session.lines)
