"""Scoring a batch of responses with the configured reward components, off the controller.

`RewardPool(cfg, task, use_ray)` starts `cfg.num_workers` scoring processes once
(local processes, or Ray actors that each drive one) and keeps them between
calls. `score` cuts the batch into chunks that idle workers take one at a time,
so slow samples (code) do not leave workers waiting. Every component call on a
sample gets `cfg.timeout_s`: one that raises or overruns scores 0, is counted in
`failures`, and the first one of the batch is kept as `example`; an overrun kills
that worker's process and a fresh one finishes its chunk.

What a reward does in its scoring process (see process.py) costs at most the samples
it touched: a call that exits the process, crashes it (a segfault), hangs (even
holding the GIL in C) or runs out of memory scores 0 and is counted by kind
(`causes`: exit, crash, memory), and the process is replaced; closing or flooding
stdio costs nothing; a worker that died or grew past its memory mark between calls
is replaced before the next chunk. Hangs do not queue without bound: the batch has
a deadline (`cfg.batch_deadline_s()`); what is unscored then is cut (scores 0,
counted as timed_out and as cause `deadline`), and the time spent on killed calls
and on waiting for replacements is reported as `time_lost_s`.

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
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from rlpost.rewards.base import LengthReward, Problem, SampleReward, Task
from rlpost.rewards.components import COMPONENTS, validate_args
from rlpost.rewards.config import ComponentConfig, RewardConfig, first_verifier
from rlpost.rewards.scoring.cells import (
    CRASHED,
    CUT,
    CUT_TEXT,
    EXITED,
    MAX_CHUNK,
    MEMORY,
    RAISED,
    TIMED_OUT,
    Chunk,
    Item,
    unscored,
)
from rlpost.rewards.scoring.process import ScoringProcess

EXAMPLE_CHARS = 300
# Sources whose per-source metrics would overwrite others': accuracy/all is the overall
# accuracy, and reward/failures/* the failure counts.
RESERVED_SOURCES = ("all", "failures")
CHUNKS_PER_WORKER = 4
# per failed status: its count in `failures`, and its cause (None: the count says it all)
FAILED = {
    RAISED: ("raised", None),
    EXITED: ("raised", "exit"),
    CRASHED: ("raised", "crash"),
    MEMORY: ("raised", "memory"),
    TIMED_OUT: ("timed_out", None),
    CUT: ("timed_out", "deadline"),
}
# How long the pool waits for a Ray actor past the batch deadline (the actor keeps the
# deadline itself; this is for an actor that does not answer at all).
RAY_GRACE_S = 30.0


def added(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    return {k: a.get(k, 0) + b.get(k, 0) for k in {**a, **b}}


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
    # of the failures, those with a cause beyond the count (nonzero only): "exit" (SystemExit
    # or the process exited), "crash" (a signal), "memory", "deadline" (cut by the batch deadline)
    causes: dict[str, int] = field(default_factory=dict)
    time_lost_s: float = 0.0  # scoring time spent on killed calls and waiting for replacements
    replaced: int = 0  # scoring processes replaced (killed, dead, or retired)

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
            added(self.failures, other.failures),
            self.example if self.example is not None else other.example,
            self.sources + other.sources,
            self.correct + other.correct,
            added(self.causes, other.causes),
            self.time_lost_s + other.time_lost_s,
            self.replaced + other.replaced,
        )

    def metrics(self, per_source: bool = False) -> dict[str, float]:
        """reward/<key>: a component's mean over the samples whose route has it;
        reward/failures/<kind>: failure counts (raised, timed_out) and, when nonzero, their
        causes (exit, crash, memory, deadline); reward/time_lost_s and
        reward/workers_replaced when nonzero. With `per_source` also, per source,
        reward/<source>/<key>, reward/<source>/mean (of the totals) and accuracy/<source>
        (the fraction correct), and accuracy/all."""
        out = {f"reward/{key}": m for key, v in self.components.items() if (m := mean_of(v)) is not None}
        out.update({f"reward/failures/{kind}": float(n) for kind, n in self.failures.items()})
        out.update({f"reward/failures/{cause}": float(n) for cause, n in self.causes.items() if n})
        if self.time_lost_s:
            out["reward/time_lost_s"] = self.time_lost_s
        if self.replaced:
            out["reward/workers_replaced"] = float(self.replaced)
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

    def score(self, items: list[Item], budget_s: float | None = None) -> Chunk:
        return self.proc.score(items, budget_s)

    def close(self) -> None:
        self.proc.close()


class _RayScorer:
    """One RewardActor, replaced when it dies or does not answer RAY_GRACE_S past the
    batch deadline (it keeps the deadline itself: this is the pool's own clock on it)."""

    def __init__(self, new_actor, k: int):
        self.new_actor, self.k = new_actor, k
        self.actor = new_actor()

    def score(self, items: list[Item], budget_s: float | None = None) -> Chunk:
        """The actor's chunk; an actor that died is replaced and the chunk sent once more
        (a death between calls costs nothing), one that does not answer is replaced and
        its chunk cut."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        t = time.monotonic()
        deadline = None if budget_s is None else t + budget_s
        lost = 0.0
        for attempt in range(2):
            budget = None if deadline is None else deadline - time.monotonic()
            sent = time.monotonic()
            try:
                chunk = ray.get(
                    self.actor.score.remote(items, budget),
                    timeout=None if budget is None else max(budget, 0.0) + RAY_GRACE_S,
                )
            except (GetTimeoutError, RayActorError) as e:
                ray.kill(self.actor, no_restart=True)
                self.actor = self.new_actor()  # it starts while the pool goes on
                lost += time.monotonic() - sent
                if isinstance(e, GetTimeoutError):
                    chunk = unscored(items, self.k, CUT, CUT_TEXT + "; the reward actor did not answer")
                    break
                chunk = unscored(items, self.k, CRASHED, f"reward actor died: {describe_short(e)}")
                continue
            chunk.time_lost_s += lost
            chunk.replaced += attempt
            return chunk
        chunk.time_lost_s, chunk.replaced = lost, attempt + 1
        return chunk

    def close(self) -> None:
        import ray

        try:
            ray.get(self.actor.close.remote(), timeout=30)
        except Exception:  # an actor that failed to start has nothing to close
            pass
        ray.kill(self.actor)


def describe_short(e: BaseException) -> str:
    """The first line of an error (Ray's run to pages)."""
    text = str(e).strip()
    return text.splitlines()[0][:EXAMPLE_CHARS] if text else type(e).__name__


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
                k, path = len(self.sample), list(sys.path)
                self.scorers = [
                    _RayScorer(lambda: actor_cls.remote(*args, path), k) for _ in range(cfg.num_workers)
                ]
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
        causes: collections.Counter = collections.Counter()
        example = None
        items = [(r, p, route.sample) for r, p, route in zip(responses, problems, routes)]
        chunks = self.run_chunks(items) if self.sample and n else []
        for start, chunk in chunks:
            for status, n_cells in collections.Counter(s for row in chunk.status for s in row).items():
                if status in FAILED:
                    count, cause = FAILED[status]
                    failures[count] += n_cells
                    if cause:
                        causes[cause] += n_cells
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
        return RewardResult(
            totals,
            components,
            failures,
            example,
            [p.source for p in problems],
            correct,
            dict(causes),
            math.fsum(chunk.time_lost_s for _, chunk in chunks),
            sum(chunk.replaced for _, chunk in chunks),
        )

    def run_chunks(self, items: list[Item]) -> list[tuple[int, Chunk]]:
        """(start index, result) per chunk, in order; each worker takes chunks until none
        are left, within the batch deadline: a chunk taken after it is cut unscored, and
        one in a worker then is cut where it stands."""
        size = min(MAX_CHUNK, max(1, -(-len(items) // (len(self.scorers) * CHUNKS_PER_WORKER))))
        todo = collections.deque((s, items[s : s + size]) for s in range(0, len(items), size))
        limit = self.cfg.batch_deadline_s()
        deadline = None if limit is None else time.monotonic() + limit
        k = len(self.sample)

        def drain(scorer) -> list[tuple[int, Chunk]]:
            done = []
            while True:
                try:
                    start, chunk = todo.popleft()
                except IndexError:
                    return done
                budget = None if deadline is None else deadline - time.monotonic()
                if budget is not None and budget <= 0:
                    done.append((start, unscored(chunk, k, CUT, CUT_TEXT)))
                else:
                    done.append((start, scorer.score(chunk, budget)))

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
