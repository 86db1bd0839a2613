"""Evaluation of a policy on every eval set: `rlpost eval CONFIG model.path=DIR`, and the
evaluations of `rlpost train` (before RL, every `eval_every` steps, after).

Each set is a file of `data.eval_files` (named by the file's stem), or the task's held-out
draw (named by the task). Every problem gets a greedy completion and `eval.n` sampled ones
(at `eval.temperature`, else the rollout's), through the rollout workers (vLLM where
configured), in chunks of at most 512 completions with a progress line each. A
completion is correct when its route's verifier scores it 1 (the reward pool, under its
timeouts). Per set and source: greedy accuracy, mean@n, pass@k (the unbiased estimator)
and maj@k for `eval.k_values()`, and the fraction of sampled completions cut by
max_new_tokens. Overall: `eval/accuracy_greedy` and `eval/accuracy_sampled` (over every
problem and sample of every set). Every completion, with its score and extracted answer,
goes to a JSONL file a person can read, and the table to a text file beside it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from rlpost.config.data import EvalConfig
from rlpost.data.stream import derive_seed
from rlpost.rewards import Problem
from rlpost.rewards.answers import final_answer
from rlpost.tracking.eval_metrics import aggregate, format_table, problem_metrics

CHUNK_COMPLETIONS = 512  # greedy + sampled completions per generation call: a progress line after each


@dataclass
class EvalSet:
    name: str
    problems: Sequence[Problem]


@dataclass
class _Scored:
    """The completions of one chunk of problems, decoded and scored (greedy, then sampled)."""

    texts: list[str]
    tokens: list[int]
    truncated: list[bool]
    rewards: list[float]
    correct: list[bool]


class Evaluator:
    def __init__(self, session, sets: list[EvalSet], cfg: EvalConfig, rollout, seed: int):
        """`session`: generates and scores (rlpost.jobs.session.Session); `rollout`: the
        RolloutConfig whose temperature / top_p the sampled completions default to."""
        self.session, self.sets, self.cfg = session, sets, cfg
        self.temperature = cfg.temperature or rollout.temperature
        self.seed = derive_seed(seed, "eval-sample")

    def run(self, generations: Path | None) -> dict[str, float]:
        """Evaluate every set: returns the metrics, prints the table, writes every
        completion to `generations` (JSONL) and the table beside it (.txt), unless None."""
        cfg, print_line = self.cfg, self.session.tracker.print_line
        if not self.sets:  # prompts from files and no data.eval_files
            return {}
        by_group: dict[tuple[str, str], list[dict[str, float]]] = {}
        per_chunk = max(1, CHUNK_COMPLETIONS // (1 + cfg.n))
        if generations is not None:
            generations.parent.mkdir(parents=True, exist_ok=True)
        out = open(generations, "w", encoding="utf-8") if generations else None  # noqa: SIM115
        try:
            for s, eval_set in enumerate(self.sets):
                problems = eval_set.problems
                count = min(len(problems), cfg.max_problems or len(problems))
                print_line(
                    f"eval {eval_set.name}: {count} problems, a greedy and {cfg.n} sampled completions each"
                )
                t0 = time.perf_counter()
                for c, start in enumerate(range(0, count, per_chunk)):
                    chunk = [problems[i] for i in range(start, min(start + per_chunk, count))]
                    # the first chunk of the first set keeps the seed evaluation always had
                    seed = self.seed if (s, c) == (0, 0) else derive_seed(self.seed, eval_set.name, c)
                    greedy, sampled = self.generate(chunk, seed)
                    for i, problem in enumerate(chunk):
                        row = slice(i * cfg.n, (i + 1) * cfg.n)
                        answers = [final_answer(t) for t in sampled.texts[row]]
                        metrics = problem_metrics(
                            sampled.correct[row],
                            answers,
                            cfg.k_values(),
                            greedy=greedy.correct[i],
                            truncated=sampled.truncated[row],
                        )
                        by_group.setdefault((eval_set.name, problem.source), []).append(metrics)
                        if out is not None:
                            write_completions(out, eval_set.name, problem, greedy, i, sampled, row, answers)
                    done = min(start + per_chunk, count)
                    print_line(
                        f"eval {eval_set.name}: {done}/{count} problems | {time.perf_counter() - t0:.0f}s"
                    )
        finally:
            if out is not None:
                out.close()
        self.session.worker_compute_times()  # evaluation's generation counts in no RL step
        table = {group: aggregate(rows) for group, rows in by_group.items()}
        text = format_table(table)
        for line in text.splitlines():
            print_line(line)
        if generations is not None:
            generations.with_suffix(".txt").write_text(text + "\n")
        # every problem has n samples, so the mean of its mean@n is the mean over samples
        rows = [row for group in by_group.values() for row in group]
        metrics = {
            "eval/accuracy_greedy": sum(r["greedy"] for r in rows) / len(rows),
            "eval/accuracy_sampled": sum(r[f"mean@{cfg.n}"] for r in rows) / len(rows),
        }
        for (set_name, source), values in table.items():
            for key, value in values.items():
                if key != "problems":
                    metrics[f"eval/{set_name}/{source}/{key}"] = value
        return metrics

    def generate(self, problems: list[Problem], seed: int) -> tuple[_Scored, _Scored]:
        session = self.session
        greedy = session.generate(problems, 1, 0.0, seed)
        sampled = session.generate(problems, self.cfg.n, self.temperature, seed, top_p=self.cfg.top_p)
        return (
            self.score([g[0] for g in greedy], problems),
            self.score([c for g in sampled for c in g], [p for p in problems for _ in range(self.cfg.n)]),
        )

    def score(self, completions: list, problems: list[Problem]) -> _Scored:
        texts = self.session.decode([c.ids for c in completions])
        tokens = [len(c.ids) for c in completions]
        result = self.session.score_texts(texts, tokens, problems)
        return _Scored(
            texts,
            tokens,
            [c.truncated for c in completions],
            result.totals,
            result.correct,
        )


def write_completions(out, set_name: str, problem: Problem, greedy, i: int, sampled, row, answers) -> None:
    base = {
        "set": set_name,
        "source": problem.source,
        "file": problem.meta.get("file"),
        "row": problem.meta.get("row"),
        "prompt": problem.prompt,
        "answer": problem.answer,
    }
    entries = [("greedy", 0, greedy, i, final_answer(greedy.texts[i]))]
    entries += [("sample", k, sampled, j, answers[k]) for k, j in enumerate(range(row.start, row.stop))]
    for mode, k, scored, j, extracted in entries:
        record = base | {
            "mode": mode,
            "sample": k,
            "response": scored.texts[j],
            "extracted": extracted,
            "reward": scored.rewards[j],
            "correct": scored.correct[j],
            "tokens": scored.tokens[j],
            "truncated": scored.truncated[j],
        }
        out.write(json.dumps(record, ensure_ascii=False) + "\n")
