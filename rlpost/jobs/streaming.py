"""Streaming generation (`rollout.async_mode: streaming`): the engines generate while the learners train.

A feeder keeps every rollout worker generating, one chunk of work at a time
(`rollout.stream.chunk_prompts` new prompts x n, or continuations), on a thread of its
own on Ray, so the engines go on while the learners train and a weight sync only waits
for the chunk each engine is in. Each response remembers the weight version of its
first token; a step takes finished groups oldest first and drops, and counts, any group
with a response sampled more than `rollout.staleness` updates before the learners'
weights (`too_stale: drop`), or the feeder starts no chunk that could end up that stale
(`too_stale: wait`: the engines wait for the learners instead).

With `rollout.stream.partial`, a chunk generates at most `segment_tokens` per response;
unfinished responses continue in a later chunk from their prefix, with whatever weights
the engine then holds, so a weight update never waits for a long generation. Each token
keeps the log-prob of the weights that sampled it, which the off-policy corrections use.
(This continues by re-sending the prefix, as the engines' own batch API allows; vLLM's
in-engine pause that keeps requests needs its asynchronous engine, which rlpost does
not run.)

Streaming is not reproducible: which weights sample a chunk depends on timing. In-process
the feeder runs a chunk per rollout worker whenever a step needs more groups, so the
engines wait for the learners there.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rlpost.data.batch import Sample
from rlpost.data.stream import derive_seed
from rlpost.engines.base import Completion
from rlpost.errors import ConfigError
from rlpost.jobs.pipeline import PENDING_FILE, STREAM_FILE, Rollouts, number_groups, score_groups


@dataclass
class Response:
    """One response in the making."""

    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    version: int | None = None  # the weight version of its first token
    truncated: bool = False
    done: bool = False


@dataclass
class StreamGroup:
    """A prompt's n responses."""

    problem: int  # index into the training problems
    prompt_ids: list[int]
    responses: list[Response]
    order: int = 0  # the how-manieth group started

    @property
    def done(self) -> bool:
        return all(r.done for r in self.responses)

    def completions(self) -> list[Completion]:
        return [Completion(r.ids, r.logprobs, r.truncated, r.version) for r in self.responses]


class Feeder:
    """Keeps the rollout workers generating; finished groups come out of `finished`."""

    def __init__(self, trainer):
        self.trainer = trainer
        cfg = trainer.cfg
        self.rc, self.sc = cfg.rollout, cfg.rollout.stream
        self.chunk = self.sc.chunk_prompts or cfg.rollout.prompts_per_step // cfg.rollout.num_workers
        self.segment = self.sc.segment_tokens if self.sc.partial else self.rc.max_new_tokens
        self.finished: queue.Queue[StreamGroup | BaseException] = queue.Queue()
        self.todo: deque[tuple[StreamGroup, Response]] = deque()  # partial responses to continue
        self.open: list[StreamGroup] = []  # started, not finished
        self.chunks = 0  # sent so far: seeds each
        self.started = 0  # groups started
        self.settled = 0  # groups trained on or dropped (the controller counts them)
        self.synced_step = 0  # the step whose weights the engines were last sent
        self.taken_steps = 0  # the steps that took their batch
        self.busy = [0.0] * cfg.rollout.num_workers  # generation seconds per worker, until taken
        self.running = 0  # chunks in flight
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._paused = threading.Event()
        self._thread: threading.Thread | None = None

    # ----- what to generate ------------------------------------------------------------------
    def allowed(self) -> bool:
        """Whether a chunk of new prompts may start: at most k + 1 batches of groups ahead
        of the learners; under `wait`, only as many as can still be trained on within the
        lag that the weights the chunk will be sampled with allow."""
        batch, k = self.rc.prompts_per_step, self.rc.staleness
        ahead = self.started - self.settled + self.chunk
        if self.sc.too_stale == "wait":
            # sampled with step p's weights, a group may train at steps up to p + 1 + k
            return ahead <= (self.synced_step + 1 + k - self.taken_steps) * batch
        return ahead <= (k + 1) * batch

    def next_chunk(self, rank: int) -> tuple | None:
        """A worker's next chunk (continuations first): `generate_timed`'s arguments and
        the work they do (its responses, and the new tokens asked of each); None: none now."""
        rc, trainer = self.rc, self.trainer
        seed = derive_seed(trainer.cfg.seed, "stream", self.chunks, rank)
        if self.todo:
            take = [self.todo.popleft() for _ in range(min(self.chunk * rc.n, len(self.todo)))]
            prompts = [g.prompt_ids + r.ids for g, r in take]
            budget = min(self.segment, *(rc.max_new_tokens - len(r.ids) for _, r in take))
            self.chunks += 1
            return (prompts, 1, rc.temperature, rc.top_p, budget, seed), (take, budget)
        if not self.allowed():
            return None
        groups = []
        for i in trainer.stream.take(self.chunk):
            prompt = trainer.encode_prompt(trainer.train_problems[i].prompt)
            responses = [Response() for _ in range(rc.n)]
            groups.append(StreamGroup(i, prompt, responses, self.started + len(groups)))
        self.started += len(groups)
        self.open += groups
        self.chunks += 1
        take = [(g, r) for g in groups for r in g.responses]
        prompts = [g.prompt_ids for g in groups]
        return (prompts, rc.n, rc.temperature, rc.top_p, self.segment, seed), (take, self.segment)

    def absorb(self, work: tuple, results: list[list[Completion]], seconds: float, rank: int) -> None:
        """A chunk's completions into their responses; finished groups to `finished`."""
        take, asked = work
        self.busy[rank] += seconds
        for (g, r), c in zip(take, (c for group in results for c in group)):
            if r.version is None:
                r.version = c.weight_version
            r.ids += c.ids
            r.logprobs += c.logprobs
            # ended: by a stop, by the length limit, or short of what was asked (the
            # engine's own context limit)
            if not c.truncated or len(c.ids) < asked or len(r.ids) >= self.rc.max_new_tokens:
                r.done, r.truncated = True, c.truncated
            else:
                self.todo.append((g, r))
        for g in [g for g in self.open if g.done]:
            self.open.remove(g)
            self.finished.put(g)

    # ----- running ----------------------------------------------------------------------------
    def pump(self) -> None:
        """In-process: one chunk on every rollout worker, one after another."""
        for rank, worker in enumerate(self.trainer.rollout.workers):
            job = self.next_chunk(rank)
            if job is not None:
                args, work = job
                self.absorb(work, *worker.generate_timed(*args), rank)

    def start(self) -> None:
        """On Ray: the feeding thread."""
        self._thread = threading.Thread(target=self._run, name="rlpost-stream-feeder", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import ray

        workers = self.trainer.rollout.workers
        running: dict = {}  # ray reference -> (rank, work)
        try:
            while not self._stop.is_set():
                with self._lock:
                    if not self._paused.is_set():
                        for rank in set(range(len(workers))) - {rank for rank, _ in running.values()}:
                            job = self.next_chunk(rank)
                            if job is not None:
                                args, work = job
                                running[workers[rank].generate_timed.remote(*args)] = (rank, work)
                    self.running = len(running)
                if not running:
                    self._stop.wait(0.01)
                    continue
                done, _ = ray.wait(list(running), num_returns=1, timeout=0.05)
                for ref in done:
                    rank, work = running.pop(ref)
                    results, seconds = ray.get(ref)
                    with self._lock:
                        self.absorb(work, results, seconds, rank)
                        self.running = len(running)
        except BaseException as e:  # noqa: BLE001 - the controller raises it
            self.finished.put(e)

    def take_finished(self, wait: bool) -> StreamGroup | None:
        """The next finished group; `wait`: waiting for one (in-process, generating it),
        else None when there is none."""
        if self._thread is None and wait:
            while self.finished.empty():
                before = self.chunks
                self.pump()
                if self.chunks == before:  # nothing allowed to start, nothing to continue
                    raise RuntimeError("streaming: every group started is finished, yet none came out")
        try:
            item = self.finished.get(block=wait)
        except queue.Empty:
            return None
        if isinstance(item, BaseException):
            raise item
        return item

    def take_busy(self) -> list[dict[str, float]]:
        """Each rollout worker's generation seconds since the last take."""
        with self._lock:
            busy, self.busy = self.busy, [0.0] * len(self.busy)
        return [{"generate": seconds} for seconds in busy]

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=600)

    # ----- checkpoints ------------------------------------------------------------------------
    def pause(self) -> None:
        """Start no more chunks, and wait for those in flight (a weight sync, a checkpoint)."""
        self._paused.set()
        with self._lock:  # a round of sending that began before the flag is over
            pass
        while self._thread is not None and self._thread.is_alive() and self.running:
            self._stop.wait(0.005)

    def resume(self) -> None:
        self._paused.clear()

    def save(self, tag_dir: Path, waiting: list[tuple[StreamGroup, list[Sample]]]) -> None:
        """Every group started and not trained on to `tag_dir`, while paused: `waiting`,
        the finished ones the controller scored (with their samples), the others finished
        or in the making."""
        with self._lock:
            finished = [self.finished.get() for _ in range(self.finished.qsize())]
            for g in finished:
                self.finished.put(g)
            groups = [g for g in finished if isinstance(g, StreamGroup)] + self.open
            place = {id(g): i for i, g in enumerate(groups)}
            todo = [(place[id(g)], [id(x) for x in g.responses].index(id(r))) for g, r in self.todo]
            state = {"waiting": waiting, "groups": groups, "todo": todo, "chunks": self.chunks}
            torch.save(state, tag_dir / STREAM_FILE)

    def load(self, tag_dir: Path, step: int) -> list[tuple[StreamGroup, list[Sample]]]:
        """A checkpoint after `step`: its unfinished groups continue, its finished ones
        are queued; returns the scored ones the controller held."""
        self.taken_steps = self.synced_step = step
        path = tag_dir / STREAM_FILE
        if not path.is_file():
            return []
        state = torch.load(path, weights_only=False)
        groups = state["groups"]
        self.chunks, self.started = state["chunks"], len(groups) + len(state["waiting"])
        self.open = [g for g in groups if not g.done]
        self.todo = deque((groups[i], groups[i].responses[j]) for i, j in state["todo"])
        for g in groups:
            if g.done:
                self.finished.put(g)
        return state["waiting"]


class Streaming:
    """The controller's side: finished groups, scored, taken by the steps oldest first."""

    def __init__(self, trainer):
        if trainer.algorithm.sampling_rule(torch.ones(8)) is not None:
            raise ConfigError(
                f"rollout.async_mode: streaming cannot tie algorithm {trainer.cfg.algorithm.name!r}'s "
                f"per-token sampling temperature for the next batch to a batch (HAPO's tau); use "
                f"rollout.async_mode=deterministic, or algorithm.tau=0"
            )
        self.trainer = trainer
        self.feeder = Feeder(trainer)
        self.waiting: list[tuple[StreamGroup, list[Sample]]] = []  # scored, not trained on

    def start(self) -> None:
        if self.trainer.use_ray:
            self.feeder.start()

    def collect(self, step: int, times: dict[str, float]) -> Rollouts:
        """prompts_per_step groups whose every response lags at most rollout.staleness
        steps, the oldest weights first; older ones are dropped and counted. With dynamic
        sampling, at most (1 + max_extra_rounds) x prompts_per_step groups are scored for
        a step, and a short batch trains as it is."""
        trainer, rc, feeder = self.trainer, self.trainer.cfg.rollout, self.feeder
        out = Rollouts()
        most = (1 + rc.max_extra_rounds) * rc.prompts_per_step if rc.dynamic_sampling else None
        while len(out.groups) < rc.prompts_per_step and (most is None or out.scored_groups < most):
            if not self.waiting:
                t = time.perf_counter()
                fresh = [feeder.take_finished(wait=True)]  # waiting for one, then what is there
                while (g := feeder.take_finished(wait=False)) is not None:
                    fresh.append(g)
                times["rollout"] += time.perf_counter() - t
                t = time.perf_counter()
                self.score(step, fresh, out)
                times["reward"] += time.perf_counter() - t
            # oldest weights first, then in the order the prompts were drawn
            self.waiting.sort(key=lambda entry: (min(r.version for r in entry[0].responses), entry[0].order))
            while self.waiting and len(out.groups) < rc.prompts_per_step:
                _, samples = self.waiting.pop(0)
                feeder.settled += 1
                lags = [trainer.weights.lag(step, s.weight_version) for s in samples]
                if any(lag is None or lag > rc.staleness for lag in lags):
                    out.stale_samples += len(samples)
                    continue
                out.groups.append(samples)
                out.lags += lags
        if len(out.groups) < rc.prompts_per_step:
            trainer.tracker.print_line(
                f"step {step}: dynamic sampling kept {len(out.groups)} of {rc.prompts_per_step} "
                f"groups of the {out.scored_groups} scored; training on those"
            )
        feeder.taken_steps = step
        if step == trainer.cfg.steps:  # nothing more to train on: free the engines
            feeder.stop()
        number_groups(out.groups)
        return out

    def score(self, step: int, groups: list[StreamGroup], out: Rollouts) -> None:
        """Score finished groups into `waiting` (dynamic sampling drops, and settles, the
        uninformative ones)."""
        trainer = self.trainer
        problems = [trainer.train_problems[g.problem] for g in groups]
        scored = score_groups(trainer, step, problems, [g.completions() for g in groups], out)
        for group, samples in zip(groups, scored):
            if samples is not None:
                self.waiting.append((group, samples))
            else:
                self.feeder.settled += 1

    def sync(self, step: int) -> None:
        """The weights after `step` to the engines, with the feeder paused: they finish their
        chunk first, so the transfer's collectives never wait behind a generation."""
        self.feeder.pause()
        try:
            self.trainer.weights.sync(step)
            self.feeder.synced_step = step
        finally:
            self.feeder.resume()

    def save(self, tag_dir: Path) -> None:
        """While paused (`Trainer.save_checkpoint`)."""
        self.feeder.save(tag_dir, self.waiting)

    def load(self, tag_dir: Path, step: int) -> None:
        if (tag_dir / PENDING_FILE).is_file():
            raise ConfigError(
                f"{tag_dir} was written with rollout.async_mode=deterministic (it holds batches sent "
                f"ahead, {PENDING_FILE}); resume with that mode"
            )
        self.waiting = self.feeder.load(tag_dir, step)

    def stop(self) -> None:
        self.feeder.stop()
