"""`rlpost cdpo CONFIG`: cDPO's pipeline (docs/algorithms.md section 2, cDPO), stage by stage.

    start     the starting policy: the task's supervised warm-up (or the model as it is)
    sample    rollout.n trajectories of each of the first cdpo.problems training problems,
              from the rollout workers, scored by the task's verifier (1: correct) ->
              samples.jsonl, positives.jsonl, negatives.jsonl, pairs_unweighted.jsonl
    positive  `rlpost sft` of the start on the correct trajectories (cdpo.contrast)
    negative  `rlpost sft` of the start on the incorrect trajectories
    weights   each pair's rejected tokens weighted by contrastive estimation,
              w_t = 1 - softmax((1 + gamma) z^pos_t - gamma z^neg_t)[y_t] -> pairs.jsonl,
              and the token-weight view (token_weights.html / .png)
    dpo       `rlpost dpo` of the start on pairs.jsonl, loss cdpo (cdpo.dpo)
    baseline  the same with loss dpo on the same pairs (cdpo.baseline)
    evaluate  greedy and sampled accuracy on the held-out problems of the start, cdpo and
              dpo models -> results.json

Every stage works in stages/<name>/ and records there what it depends on: its config and
the records of the stages it reads (rlpost/jobs/stages.py). Running the pipeline again on
the run directory (`resume=RUN_DIR`) skips each stage whose record matches, continues an
interrupted training stage from its last checkpoint, and redoes a stage whose inputs
changed, and with it every stage that reads it.

Pairs (rlpost/data/trajectories.py): per problem with both kinds, each distinct incorrect trajectory (at most
cdpo.pairs_per_problem) is paired with a correct one, taken in turn. The weights are
computed on the rejected response exactly as `rlpost dpo` tokenizes it (the pairs file is
read back through the same loader), so there is one weight per token it trains on.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlpost.config.cdpo import CDPOConfig, stage_config
from rlpost.config.load import dump_config
from rlpost.data.datasets import load_preference_pairs
from rlpost.data.prompts import prompt_record
from rlpost.data.stream import derive_seed
from rlpost.data.trajectories import make_pairs, training_rows, usable
from rlpost.errors import ConfigError
from rlpost.files import read_jsonl, write_json, write_jsonl
from rlpost.jobs.run_dir import mark_failed, prepare_run_dir
from rlpost.jobs.session import VERIFIER, Session
from rlpost.jobs.stages import Stages
from rlpost.tracking.tracker import Tracker
from rlpost.workers.contrast import ContrastScorer
from rlpost.workers.group import WorkerGroup

STAGES = ("start", "sample", "positive", "negative", "weights", "dpo", "baseline", "evaluate")


@dataclass
class CDPOResult:
    run_dir: Path
    accuracy: dict[str, dict[str, float]]  # model (start, `weighted_label`, dpo) -> eval/accuracy_*


def weighted_label(cfg: CDPOConfig) -> str:
    """The name of the `dpo` stage's model in the results: its loss (cdpo by default; treg when
    `cdpo.dpo.algorithm.loss` says so), `dpo_stage` when that is plain DPO, the baseline's name."""
    loss = stage_config(cfg, "dpo", ".", ".").algorithm.loss
    return "dpo_stage" if loss == "dpo" else loss


class CDPOTracker(Tracker):
    """The pipeline's own metrics (one row, step 0, when it ends: the training stages log
    theirs in their directories); the console line has no steps."""

    def __init__(self, run_dir: Path, cfg: CDPOConfig, weighted: str):
        """`weighted`: the name of the dpo stage's model (`weighted_label`)."""
        self.console_metrics = [(f"accuracy/{m}_greedy", m, "{:.3f}") for m in ("start", weighted, "dpo")]
        super().__init__(run_dir, cfg)

    def format_line(self, metrics: dict[str, Any], step: int) -> str:
        return "cdpo: greedy accuracy | " + super().format_line(metrics, step).split(" | ", 1)[-1]


class Pipeline:
    def __init__(self, cfg: CDPOConfig, run_dir: Path):
        self.cfg, self.run_dir = cfg, run_dir
        self.session = Session(cfg, run_dir)
        self.tracker: Tracker | None = None  # the pipeline's; the session prints to it too
        self.stages = Stages(run_dir / "stages", lambda line: self.tracker.print_line(f"[cdpo] {line}"))

    @contextmanager
    def rollout(self, model: Path):
        """Rollout workers on `model` for the duration; their slots are free again after
        (the training stages' learners take the learners' slots)."""
        self.session.start_rollout(model)
        try:
            yield
        finally:
            self.session.stop_rollout()

    def shutdown(self) -> None:
        self.session.shutdown()
        if self.tracker is not None:
            self.tracker.close()

    # ----- the pipeline ----------------------------------------------------------------
    def run(self) -> CDPOResult:
        cfg = self.cfg
        # the pipeline's W&B run in the group of its stages' runs (`stage_config`)
        group = cfg.tracking.model_copy(update={"group": cfg.tracking.group or cfg.name})
        weighted = weighted_label(cfg)
        self.tracker = tracker = CDPOTracker(
            self.run_dir, cfg.model_copy(update={"tracking": group}), weighted
        )
        directory, record = self.stages.begin(
            "start", cfg.model_dump(mode="json", include={"seed", "model", "task", "warmup", "learner"}), ()
        )
        start = self.session.prepare(tracker, directory / "model")
        if record is None:
            self.stages.finish("start", {"model": str(start)})
        sampled = self.stages.run(
            "sample",
            cfg.model_dump(
                mode="json",
                include={"rollout": True, "reward": True, "cdpo": {"problems", "pairs_per_problem"}},
            ),
            ("start",),
            lambda d: self.sample(d, start),
        )
        models = {}
        for kind in ("positive", "negative"):
            data = self.run_dir / "stages" / "sample" / f"{kind}s.jsonl"
            models[kind] = self.stages.run(
                kind,
                cfg.cdpo.contrast,
                ("sample",),
                lambda d, kind=kind, data=data: self.train(kind, d, start, data),
            )["model"]
        self.stages.run(
            "weights",
            cfg.cdpo.gamma,
            ("sample", "positive", "negative"),
            lambda d: self.weights(d, models["positive"], models["negative"]),
        )
        pairs = self.run_dir / "stages" / "weights" / "pairs.jsonl"
        finals = {"start": str(start)}
        finals[weighted] = self.stages.run(
            "dpo", cfg.cdpo.dpo, ("weights",), lambda d: self.train("dpo", d, start, pairs)
        )["model"]
        if cfg.cdpo.baseline:
            finals["dpo"] = self.stages.run(
                "baseline", cfg.cdpo.dpo, ("weights",), lambda d: self.train("baseline", d, start, pairs)
            )["model"]
        accuracy = self.stages.run(
            "evaluate",
            finals,
            tuple(r for r in ("dpo", "baseline") if r in self.stages.records),
            lambda d: self.evaluate(finals),
        )
        metrics = {
            f"accuracy/{m}_{k.rsplit('_', 1)[-1]}": v for m, acc in accuracy.items() for k, v in acc.items()
        }
        metrics.update({f"sample/{k}": v for k, v in sampled.items()})
        write_json(
            self.run_dir / "results.json",
            {"accuracy": accuracy, "sample": sampled, "stages": self.stages.records},
            indent=1,
        )
        tracker.log(metrics, step=0)
        return CDPOResult(self.run_dir, accuracy)

    def sample(self, directory: Path, start: Path) -> dict:
        """rollout.n trajectories per problem, scored by the verifier; the training data
        of the positive and negative models and the unweighted pairs."""
        cfg, session = self.cfg, self.session
        problems = session.train_problems[: cfg.cdpo.problems]
        per_round = cfg.rollout.prompts_per_step
        rows, t0 = [], time.time()
        with self.rollout(start):
            for first in range(0, len(problems), per_round):
                batch = problems[first : first + per_round]
                groups = session.generate(
                    batch, cfg.rollout.n, cfg.rollout.temperature, derive_seed(cfg.seed, "cdpo-sample", first)
                )
                flat = [(i, c) for i, group in zip(range(first, first + len(batch)), groups) for c in group]
                scores = session.score([c.ids for _, c in flat], [problems[i] for i, _ in flat])
                texts = session.tokenizer.batch_decode([c.ids for _, c in flat], skip_special_tokens=True)
                for (i, c), text, verdict, total in zip(
                    flat, texts, scores.components[VERIFIER], scores.totals
                ):
                    rows.append(
                        {
                            "problem": i,
                            "question": problems[i].prompt,
                            "response": text,
                            "correct": verdict >= 1.0,
                            "verifier": verdict,
                            "reward": total,
                            "truncated": c.truncated,
                        }
                    )
                correct = sum(r["correct"] for r in rows) / len(rows)
                empty = sum(not usable(r) for r in rows)
                self.tracker.print_line(
                    f"[cdpo] sample: {first + len(batch)}/{len(problems)} problems "
                    f"| {correct:.1%} correct | {empty} empty (not used) "
                    f"| {time.time() - t0:.0f}s"
                )
        pairs = make_pairs(rows, cfg.cdpo.pairs_per_problem)
        if not pairs:
            raise RuntimeError(
                f"cdpo: no problem among {len(problems)} has both a correct and an "
                f"incorrect trajectory; nothing to pair (see {directory}/samples.jsonl)"
            )
        write_jsonl(directory / "samples.jsonl", rows)
        # as the offline loaders read them, the prompt tokenizes as the rollout workers' did
        prompts = [prompt_record(session.tokenizer, p.prompt, cfg.task) for p in problems]
        for name, records in training_rows(rows, pairs, prompts).items():
            write_jsonl(directory / f"{name}.jsonl", records)
        return {
            "trajectories": len(rows),
            "correct_fraction": sum(r["correct"] for r in rows) / len(rows),
            "empty_responses": sum(not usable(r) for r in rows),
            "problems_with_pairs": len({p["problem"] for p in pairs}),
            "pairs": len(pairs),
        }

    def train(self, stage: str, directory: Path, start: Path, data: Path) -> dict:
        """A training stage: an `rlpost sft` / `rlpost dpo` job in `directory`, continued
        from its last checkpoint when there is one."""
        from rlpost.jobs.offline import TRAINERS

        job = stage_config(self.cfg, stage, start, data)
        job = job.model_copy(update={"resume": str(directory), "output_dir": str(directory.parent)})
        (directory / "config.yaml").write_text(dump_config(job))
        try:
            trainer = TRAINERS["sft" if stage in ("positive", "negative") else "dpo"](
                job, slots=self.session.placement.slots("learner")
            )
        except ConfigError as e:
            section = "contrast" if stage in ("positive", "negative") else "dpo"
            raise ConfigError(f"stage {stage} (cdpo.{section}): {e}") from None
        try:
            result = trainer.run()
        finally:
            trainer.shutdown()
        return {
            "model": str(result.run_dir / "final_model"),
            "before": result.before,
            "after": {k: v for k, v in result.after.items() if k.startswith("eval/")},
        }

    def weights(self, directory: Path, positive: str, negative: str) -> dict:
        """Critical weights of every pair's rejected tokens -> pairs.jsonl, and the view."""
        from rlpost.tracking.token_view import WeightedTokens, write_token_view

        cfg, tokenizer = self.cfg, self.session.tokenizer
        source = self.run_dir / "stages" / "sample" / "pairs_unweighted.jsonl"
        pairs, _ = load_preference_pairs(source, tokenizer, strict=True)
        lc, n = cfg.learner, cfg.learner.num_learners
        scorers = WorkerGroup(
            ContrastScorer,
            n,
            lambda rank: dict(
                positive=positive,
                negative=negative,
                dtype=cfg.model.dtype,
                gamma=cfg.cdpo.gamma,
                pad_id=tokenizer.pad_token_id,
                chunk_size=lc.logprob_chunk_size,
                micro_batch_tokens=lc.micro_batch_tokens,
                micro_batch_size=lc.micro_batch_size,
            ),
            use_ray=self.session.use_ray,
            num_gpus=cfg.ray.gpus_per_learner,
            slots=self.session.placement.slots("learner"),
        )
        try:
            parts = [[(p.prompt_ids, p.rejected_ids) for p in pairs[r::n]] for r in range(n)]
            scored = scorers.call("weights", per_rank=[(part,) for part in parts])
        finally:
            scorers.shutdown()
        weights = [None] * len(pairs)
        for r, part in enumerate(scored):
            weights[r::n] = part
        rows = read_jsonl(source)
        write_jsonl(
            directory / "pairs.jsonl", [{**row, "rejected_weights": w} for row, w in zip(rows, weights)]
        )
        shown = [
            WeightedTokens(
                label=f"pair {i} (problem {rows[i]['problem']})",
                prompt=self.session.train_problems[rows[i]["problem"]].prompt,
                tokens=[tokenizer.decode([t]) for t in pairs[i].rejected_ids],
                weights=weights[i],
                chosen=tokenizer.decode(pairs[i].chosen_ids),
            )
            for i in range(min(cfg.cdpo.view_pairs, len(pairs)))
        ]
        html, png = write_token_view(
            directory, shown, title="cDPO critical-token weights", weight_name="w_t = 1 - s_t"
        )
        self.tracker.print_line(f"[cdpo] token-weight view: {html} and {png}")
        flat = [w for ws in weights for w in ws]
        return {
            "pairs": len(pairs),
            "weight_mean": sum(flat) / len(flat),
            "weight_above_half": sum(w > 0.5 for w in flat) / len(flat),
        }

    def evaluate(self, models: dict[str, str]) -> dict[str, dict[str, float]]:
        """The session's evaluation (greedy and sampled accuracy on the held-out
        problems) of each model, one rollout group at a time."""
        out = {}
        for name, path in models.items():
            with self.rollout(Path(path)):
                out[name] = self.session.evaluate(name)
            self.tracker.print_line(
                f"[cdpo] evaluate {name}: greedy {out[name]['eval/accuracy_greedy']:.3f}, "
                f"sampled {out[name]['eval/accuracy_sampled']:.3f}"
            )
        return out


def run_cdpo(cfg: CDPOConfig) -> CDPOResult:
    run_dir = prepare_run_dir(cfg)
    try:
        pipeline = Pipeline(cfg, run_dir)
        try:
            return pipeline.run()
        finally:
            pipeline.shutdown()
    except BaseException as e:  # the pipeline's stages start at once: any failure marks the run
        mark_failed(run_dir, e)
        raise
