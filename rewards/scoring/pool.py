"""Scoring a batch of responses with the configured reward components, off the controller.

`RewardPool(cfg, task, use_ray)` starts `cfg.num_workers` scoring processes once
(local processes, or Ray actors that each drive one) and keeps them between
calls. `score` cuts the batch into chunks that idle workers take one at a time,
so slow samples (code) do not leave workers waiting. Every component call on a
sample gets `cfg.timeout_s`: one that raises or overruns scores 0, is counted in
`failures`, and the first one of the batch is kept as `example`; an overrun kills
that worker's process and a fresh one finishes its chunk.

Nothing is scored inline on the controller, not even a cheap task score: only a
separate process can be stopped in the middle of a pure-Python loop, and the
round trip through a warm worker costs ~2 ms for 256 arithmetic samples
(measured, see bench/rewards.py). Length components (length, overlong) are the
exception: arithmetic on integers, computed here for the whole batch.

With `reward.sources`, each sample is scored by its route's components alone (its
problem's source's list, else `reward.components`): every worker builds the union of
the routes' components, and each chunk item carries the indices of those that apply,
so the others are never called. A component off a sample's route is NaN in
`RewardResult.components` and not in its total; `correct` is its route's verifier == 1.
"""

from __future__ import annotations

import collections
import math
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from rlpost.rewards.base import LengthReward, Problem, SampleReward, Task
from rlpost.rewards.components import COMPONENTS, validate_args
from rlpost.rewards.config import ComponentConfig, RewardConfig, first_verifier
from rlpost.rewards.scoring.worker import MAX_CHUNK, RAISED, TIMED_OUT, Chunk, Item, ScoringProcess

EXAMPLE_CHARS = 300
# Sources whose per-source metrics would overwrite others': accuracy/all is the overall
# accuracy, and reward/failures/* the failure counts.
RESERVED_SOURCES = ("all", "failures")
CHUNKS_PER_WORKER = 4


def mean_of(values: list[float]) -> float | None:
    """The mean of the values that apply (not NaN); None when none does."""
    applied = [v for v in values if not math.isnan(v)]
    return sum(applied) / len(applied) if applied else None


@dataclass
class RewardResult:
    totals: list[float]  # per sample: the weighted sum of its route's components
    components: dict[str, list[float]]  # per key: its unweighted value per sample, NaN off its routes
    failures: dict[str, int]  # "raised", "timed_out": component calls that scored 0 for it
    example: str | None  # one failure: component, error, start of the response
    sources: list[str] = field(default_factory=list)  # per sample: its problem's source
    correct: list[bool] = field(default_factory=list)  # per sample: its route's verifier gave 1

    def __post_init__(self):
        # Built without them (a test's stub scorer): one source "", and the "task"
        # component, the default verifier, says what is correct.
        n = len(self.totals)
        if not self.sources:
            self.sources = [""] * n
        if not self.correct:
            self.correct = [v == 1 for v in self.components.get("task", [math.nan] * n)]

    def __add__(self, other: RewardResult) -> RewardResult:
        """The results of two batches as one (e.g. the generation rounds of a step)."""
        return RewardResult(
            self.totals + other.totals,
            {k: v + other.components[k] for k, v in self.components.items()},
            {k: n + other.failures[k] for k, n in self.failures.items()},
            self.example if self.example is not None else other.example,
            self.sources + other.sources,
            self.correct + other.correct,
        )

    def metrics(self, per_source: bool = False) -> dict[str, float]:
        """reward/<key>: a component's mean over the samples whose route has it;
        reward/failures/<kind>: failure counts. With `per_source` also, per source,
        reward/<source>/<key>, reward/<source>/mean (of the totals) and accuracy/<source>
        (the fraction correct), and accuracy/all."""
        out = {f"reward/{key}": m for key, v in self.components.items() if (m := mean_of(v)) is not None}
        out.update({f"reward/failures/{kind}": float(n) for kind, n in self.failures.items()})
        if per_source:
            out.update(self.source_metrics())
        return out

    def source_metrics(self) -> dict[str, float]:
        rows: dict[str, list[int]] = {}
        for i, source in enumerate(self.sources):
            rows.setdefault(source, []).append(i)
        out = {}
        for source, idx in sorted(rows.items()):
            for key, v in self.components.items():
                if (m := mean_of([v[i] for i in idx])) is not None:
                    out[f"reward/{source}/{key}"] = m
            out[f"reward/{source}/mean"] = sum(self.totals[i] for i in idx) / len(idx)
            out[f"accuracy/{source}"] = sum(self.correct[i] for i in idx) / len(idx)
        if self.correct:
            out["accuracy/all"] = sum(self.correct) / len(self.correct)
        return out


@dataclass(frozen=True)
class Route:
    """The components that score the samples of one source (or of the default route)."""

    components: list[ComponentConfig]
    keys: frozenset[str]
    sample: frozenset[int]  # indices into the pool's per-sample components
    verifier: str | None  # the key whose value 1 means correct

    @classmethod
    def of(cls, components: list[ComponentConfig], sample: list[ComponentConfig]) -> Route:
        keys = frozenset(c.key for c in components)
        used = frozenset(i for i, c in enumerate(sample) if c.key in keys)
        return cls(components, keys, used, first_verifier(components))


class RewardActor:
    """A Ray actor driving one scoring process (the process is what a timeout kills)."""

    def __init__(
        self, components: list, task: Task, timeout_s: float, memory_mb: int, driver_path: list[str]
    ):
        # what the driver can import (a user's reward module), its scoring process can too
        sys.path += [p for p in driver_path if p not in sys.path]
        self.proc = ScoringProcess(components, task, timeout_s, memory_mb)

    def ready(self) -> None:
        self.proc.wait_ready()

    def score(self, items: list[Item]) -> Chunk:
        return self.proc.score(items)

    def close(self) -> None:
        self.proc.close()


class _RayScorer:
    def __init__(self, actor):
        self.actor = actor

    def score(self, items: list[Item]) -> Chunk:
        import ray

        return ray.get(self.actor.score.remote(items))

    def close(self) -> None:
        import ray

        try:
            ray.get(self.actor.close.remote(), timeout=30)
        except Exception:  # an actor that failed to start has nothing to close
            pass
        ray.kill(self.actor)


class RewardPool:
    def __init__(self, cfg: RewardConfig, task: Task, use_ray: bool = False):
        self.cfg = cfg
        self.union = cfg.all_components()  # each worker builds them all, once
        self.sample = [c for c in self.union if issubclass(COMPONENTS[c.name], SampleReward)]
        self.length: list[tuple[ComponentConfig, LengthReward]] = [
            (c, COMPONENTS[c.name](validate_args(c.name, c.args)))
            for c in self.union
            if issubclass(COMPONENTS[c.name], LengthReward)
        ]
        self.default = Route.of(cfg.components, self.sample)
        self.routes = {source: Route.of(route, self.sample) for source, route in cfg.sources.items()}
        self.scorers: list = []
        self.threads = ThreadPoolExecutor(cfg.num_workers, "rlpost-reward")
        if not self.sample:
            return
        args = (self.sample, task, cfg.timeout_s, cfg.memory_mb)
        try:
            if use_ray:
                import ray

                actor_cls = ray.remote(RewardActor).options(num_cpus=cfg.num_cpus_per_worker)
                self.scorers = [_RayScorer(actor_cls.remote(*args, sys.path)) for _ in range(cfg.num_workers)]
                ray.get([s.actor.ready.remote() for s in self.scorers])
            else:
                self.scorers = [ScoringProcess(*args) for _ in range(cfg.num_workers)]
                for proc in self.scorers:  # they all started at once; now wait for each
                    proc.wait_ready()
        except Exception:
            self.close()
            raise

    def score(
        self, responses: list[str], problems: list[Problem], lengths: list[int] | None = None
    ) -> RewardResult:
        """Score responses[i] against problems[i] with the components of its problem's
        route. `lengths` are the responses' lengths for the length components (the
        trainer passes token counts; default: characters)."""
        assert len(responses) == len(problems)
        n = len(responses)
        routes = [self.routes.get(p.source, self.default) for p in problems]
        values: dict[str, list[float]] = {}
        failures = {"raised": 0, "timed_out": 0}
        example = None
        items = [(r, p, route.sample) for r, p, route in zip(responses, problems, routes)]
        chunks = self.run_chunks(items) if self.sample and n else []
        for start, chunk in chunks:
            for status in chunk.status:
                failures["raised"] += status.count(RAISED)
                failures["timed_out"] += status.count(TIMED_OUT)
            if chunk.error and example is None:
                c, i, text = chunk.error
                example = (
                    f"{self.sample[c].key}: {text[:EXAMPLE_CHARS]} | response: "
                    f"{responses[start + i][:EXAMPLE_CHARS]!r}"
                )
        for c, comp in enumerate(self.sample):
            values[comp.key] = [row[c] for _, chunk in chunks for row in chunk.values]
        sizes = lengths if lengths is not None else [len(r) for r in responses]
        for comp, fn in self.length:
            computed = [float(v) for v in fn(sizes)] if n else []
            values[comp.key] = [v if comp.key in r.keys else math.nan for v, r in zip(computed, routes)]
        components = {c.key: values[c.key] for c in self.union}
        totals = [
            math.fsum(c.weight * components[c.key][i] for c in r.components) for i, r in enumerate(routes)
        ]
        correct = [r.verifier is not None and components[r.verifier][i] == 1 for i, r in enumerate(routes)]
        return RewardResult(totals, components, failures, example, [p.source for p in problems], correct)

    def run_chunks(self, items: list[Item]) -> list[tuple[int, Chunk]]:
        """(start index, result) per chunk, in order; each worker takes chunks until none
        are left."""
        size = min(MAX_CHUNK, max(1, -(-len(items) // (len(self.scorers) * CHUNKS_PER_WORKER))))
        todo = collections.deque((s, items[s : s + size]) for s in range(0, len(items), size))

        def drain(scorer) -> list[tuple[int, Chunk]]:
            done = []
            while True:
                try:
                    start, chunk = todo.popleft()
                except IndexError:
                    return done
                done.append((start, scorer.score(chunk)))

        results = [r for f in [self.threads.submit(drain, s) for s in self.scorers] for r in f.result()]
        return sorted(results, key=lambda r: r[0])

    def close(self) -> None:
        for scorer in self.scorers:
            scorer.close()
        self.scorers = []
        self.threads.shutdown()

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
