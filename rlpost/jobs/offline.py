"""`rlpost sft` and `rlpost dpo`: training on a dataset instead of rollouts.

They run on the RL job's machinery (run directory, Tracker, the seeded epoch stream,
checkpoints and resume, DeepSpeed learner groups in-process or on Ray).

    tokenizer, data (bad rows skipped and reported, or `data.strict` stops) -> run directory
      -> learners (the reference model inside them where the loss needs one)
      -> per step: `batch_size` rows from seeded epoch orders -> learners -> metrics
      -> evaluation on the held-out rows -> checkpoints -> final_model (a HF directory)

Everything that can reject the job (config, data, batch size against the data) happens in
the constructor, before a run directory, a model or a learner exists.
"""

from __future__ import annotations

import json
import math
import random
import string
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from rlpost.algorithms import build_algorithm
from rlpost.config.offline import DPOJobConfig, OfflineConfig, SFTJobConfig
from rlpost.data.batch import Sample
from rlpost.data.datasets import load_preference_pairs, load_sft_examples
from rlpost.data.pairs import pair_samples, sft_samples, shard_pairs
from rlpost.data.rows import PreferenceDataError
from rlpost.data.stream import EpochStream, derive_seed
from rlpost.errors import ConfigError
from rlpost.jobs.run_dir import (
    Retention,
    latest_checkpoint,
    load_checkpoint,
    prepare_run_dir,
    save_checkpoint,
    save_final_model,
)
from rlpost.jobs.session import init_ray
from rlpost.jobs.treg import attach_token_rewards, revision_templates
from rlpost.jobs.update import learner_split, train_minibatches
from rlpost.model.load import char_tokenizer, load_tokenizer, materialise_initial_model, pretrained_dir
from rlpost.tracking.metrics import MetricSums
from rlpost.tracking.token_view import WeightedTokens, write_token_view
from rlpost.tracking.tracker import METRICS_FILE, Tracker, read_metrics
from rlpost.workers.group import Slots, WorkerGroup
from rlpost.workers.learner import Learner, LRSchedule, start_learner_group
from rlpost.workers.pair_learner import PairLearner
from rlpost.workers.threads import set_threads

# A tiny model built in code (model.kind: tiny) gets a character tokenizer of printable ASCII:
# offline data is free text, unlike a task's known alphabet.
TINY_ALPHABET = string.printable


@dataclass
class OfflineResult:
    run_dir: Path
    before: dict[str, float]  # the evaluation at step 0 (empty without held-out rows)
    after: dict[str, float]  # the last step's metrics


class OfflineTrainer:
    """The job both commands share; `SFTTrainer` and `DPOTrainer` say what the data, a
    step and an evaluation are."""

    unit = "rows"
    tracker_class = Tracker
    learner_role = Learner

    def __init__(self, cfg: OfflineConfig, slots: Slots | None = None):
        """`slots`: where the learners go in a pipeline's `Placement` (`rlpost cdpo`);
        None: a placement group of their own."""
        self.cfg, self.use_ray, self.slots = cfg, cfg.mode == "ray", slots
        self.algorithm = build_algorithm(*cfg.algorithm_spec())
        if self.algorithm.needs.history_model == "ema" and cfg.learner.zero_stage == 3:
            raise ConfigError(
                "key 'learner.zero_stage': 3 shards the parameters that each learner's EMA "
                "(algorithm.history_model: ema) averages; use stage 0, 1 or 2"
            )
        self.tokenizer = (
            load_tokenizer(pretrained_dir(cfg.model))
            if cfg.model.kind != "tiny"
            else char_tokenizer(TINY_ALPHABET)
        )
        rows, self.report = self.load_data()
        if not rows:
            first = "; ".join(f"{reason}: {text}" for reason, text in self.report.first.items())
            raise PreferenceDataError(
                f"{self.report.summary()}: nothing to train on (first of each: {first})"
            )
        fraction = cfg.data.eval_fraction
        held_out = max(1, round(fraction * len(rows))) if fraction > 0 else 0
        order = list(range(len(rows)))
        random.Random(derive_seed(cfg.seed, "eval-split")).shuffle(order)
        self.eval_rows = [rows[i] for i in sorted(order[:held_out])]
        self.train_rows = [rows[i] for i in sorted(order[held_out:])]
        if cfg.batch_size > len(self.train_rows):
            raise ConfigError(
                f"key 'batch_size': {cfg.batch_size} is more than the "
                f"{len(self.train_rows)} training {self.unit} of {cfg.data.path} "
                f"({held_out} held out for evaluation)"
            )
        self.steps = cfg.steps or math.ceil(cfg.epochs * len(self.train_rows) / cfg.batch_size)
        self.stream = EpochStream(len(self.train_rows), cfg.seed)
        self.checkpoint = latest_checkpoint(Path(cfg.resume)) if cfg.resume else None
        if self.checkpoint and self.checkpoint[1]["train_rows"] != len(self.train_rows):
            raise ConfigError(
                f"resume: {cfg.resume} trained on {self.checkpoint[1]['train_rows']} "
                f"{self.unit}; the data now gives {len(self.train_rows)}"
            )
        self.learners: WorkerGroup | None = None
        self.tracker: Tracker | None = None

    # ----- what differs between the jobs -------------------------------------------------
    def load_data(self):
        raise NotImplementedError

    def train_step(self, rows: list) -> dict[str, float]:
        raise NotImplementedError

    def evaluate(self) -> dict[str, float]:
        raise NotImplementedError

    def after_training(self) -> None:
        """What the job writes after its last step, with the learners still up."""

    # ----- the job -------------------------------------------------------------------------
    def run(self) -> OfflineResult:
        cfg = self.cfg
        set_threads()
        self.run_dir = run_dir = prepare_run_dir(cfg)
        print(
            f"data: {self.report.summary()}; {len(self.train_rows)} train, {len(self.eval_rows)} held out",
            flush=True,
        )
        (run_dir / "data_report.json").write_text(json.dumps(asdict(self.report), indent=1))
        checkpoint = self.checkpoint
        start = materialise_initial_model(cfg.model, TINY_ALPHABET, cfg.seed, run_dir / "models" / "initial")
        self.tracker = self.tracker_class(
            run_dir,
            cfg.model_copy(update={"steps": self.steps}),
            resume_step=checkpoint[1]["step"] if checkpoint else None,
        )
        if self.use_ray:
            init_ray(cfg.ray, cfg.learner.num_learners)
        lc = cfg.learner
        self.learners = start_learner_group(
            cfg,
            start,
            cfg.algorithm_spec(),
            LRSchedule(lc.lr, lc.lr_warmup_steps, lc.lr_schedule, total_steps=self.steps),
            pad_id=self.tokenizer.pad_token_id,
            use_ray=self.use_ray,
            slots=self.slots,
            role=self.learner_role,
        )
        self.packed = self.learners.call("is_packed")[0]
        attach_token_rewards(self)  # T-REG's constants of the data, before any step or evaluation
        first = 1
        if checkpoint:
            tag, state = checkpoint
            load_checkpoint(run_dir, self.learners, tag, state)
            self.stream.position = state["data_position"]
            first = state["step"] + 1
            self.tracker.print_line(f"resumed {run_dir} after step {first - 1}")
        elif self.eval_rows:
            self.tracker.log(self.evaluate(), step=0)
        for step in range(first, self.steps + 1):
            t = time.perf_counter()
            rows = [self.train_rows[i] for i in self.stream.take(cfg.batch_size)]
            metrics = self.train_step(rows)
            metrics["time/step"] = time.perf_counter() - t
            metrics["tokens_per_sec"] = metrics["tokens"] / metrics["time/step"]
            if self.eval_rows and (step == self.steps or (cfg.eval_every and step % cfg.eval_every == 0)):
                metrics.update(self.evaluate())
            self.tracker.log(metrics, step=step)
            if (cfg.save_every and step % cfg.save_every == 0) or step == self.steps:
                self.save_checkpoint(step)
        self.after_training()
        save_final_model(run_dir, self.learners, self.tokenizer)
        self.shutdown()
        rows = read_metrics(run_dir / METRICS_FILE)
        return OfflineResult(run_dir, next((r for r in rows if r["step"] == 0), {}), rows[-1])

    def save_checkpoint(self, step: int) -> None:
        save_checkpoint(
            self.run_dir,
            self.learners,
            step,
            {"data_position": self.stream.position, "train_rows": len(self.train_rows)},
            retention=Retention.of(self.cfg),
        )
        self.tracker.plot()

    def shutdown(self) -> None:
        if self.learners is not None:
            self.learners.shutdown()
            self.learners = None
        if self.tracker is not None:
            self.tracker.close()


def tokens(samples: list[Sample]) -> int:
    return sum(len(s.prompt_ids) + s.num_tokens for s in samples)


# ----- SFT -----------------------------------------------------------------------------------
class SFTTracker(Tracker):
    console_metrics = [
        ("loss", "loss", "{:.4f}"),
        ("nll", "nll", "{:.4f}"),
        ("kl", "kl", "{:.4f}"),
        ("eval/nll", "eval_nll", "{:.4f}"),
        ("entropy", "entropy", "{:.3f}"),
        ("time/step", "time", "{:.2f}s"),
        ("tokens_per_sec", "tok/s", "{:.0f}"),
    ]
    plot_panels = [
        ("Loss", "loss", [("loss", "loss")], False),
        ("NLL", "nats / token", [("nll", "train"), ("eval/nll", "held out")], False),
        ("KL to the reference (ASFT)", "nats / token", [("kl", "kl")], False),
        ("Entropy", "nats / token", [("entropy", "entropy")], False),
    ]


class SFTTrainer(OfflineTrainer):
    """Supervised fine-tuning with `algorithms/sft.py` (nll, dft or asft) through the
    learner's ordinary `train_minibatches`: token-mean weights over the whole mini-batch,
    then any split."""

    unit = "examples"
    tracker_class = SFTTracker
    cfg: SFTJobConfig

    def load_data(self):
        d = self.cfg.data
        return load_sft_examples(d.path, self.tokenizer, d.max_length, d.strict, d.split)

    def shard(self, samples: list[Sample]) -> list[list[list[Sample]]]:
        return learner_split(self.cfg.learner, self.packed)(samples)

    def train_step(self, rows: list) -> dict[str, float]:
        samples = sft_samples(rows)
        (merged,) = train_minibatches(self.learners, self.algorithm, [samples], self.shard)
        return {**merged.result(), "tokens": tokens(samples)}

    def evaluate(self) -> dict[str, float]:
        """Token-mean NLL of the held-out completions."""
        parts = self.shard(sft_samples(self.eval_rows))
        results = self.learners.call("logprobs", per_rank=[(p,) for p in parts])
        logp = torch.cat([r["logp"] for r in results if r["logp"] is not None])
        return {"eval/nll": -logp.double().mean().item()}


# ----- preference pairs -------------------------------------------------------------------
class DPOTracker(Tracker):
    console_metrics = [
        ("loss", "loss", "{:.4f}"),
        ("rewards/accuracy", "acc", "{:.3f}"),
        ("rewards/margin", "margin", "{:.4f}"),
        ("kl/per_token", "kl", "{:.5f}"),
        ("mask_u/mean", "mask", "{:.3f}"),
        ("critical_weight/mean", "w_crit", "{:.3f}"),
        ("eval/rewards/accuracy", "eval_acc", "{:.3f}"),
        ("eval/rewards/margin", "eval_margin", "{:.4f}"),
        ("time/step", "time", "{:.2f}s"),
        ("tokens_per_sec", "tok/s", "{:.0f}"),
    ]
    plot_panels = [
        ("Loss", "loss", [("loss", "train"), ("eval/loss", "held out")], False),
        (
            "Implicit reward accuracy",
            "fraction of pairs",
            [("rewards/accuracy", "train"), ("eval/rewards/accuracy", "held out")],
            True,
        ),
        (
            "Reward margin",
            "beta (Delta_w - Delta_l)",
            [("rewards/margin", "train"), ("eval/rewards/margin", "held out")],
            False,
        ),
        (
            "Log-probs",
            "sum of log p per response",
            [("logps/chosen", "chosen"), ("logps/rejected", "rejected")],
            False,
        ),
        (
            "KL to the reference",
            "nats / token",
            [("kl/chosen_per_token", "chosen"), ("kl/rejected_per_token", "rejected")],
            False,
        ),
        ("SparsePO mask", "", [("mask_u/mean", "mean"), ("mask_u/sparsity", "sparsity")], False),
        ("cDPO critical weight", "mean over rejected tokens", [("critical_weight/mean", "w")], False),
    ]


class DPOTrainer(OfflineTrainer):
    """DPO, TDPO1/2, SparsePO (activation or learned masks), cDPO's weighted DPO or T-REG on
    preference pairs, through `PairLearner.train_pairs`: pair-atomic micro-batches, loss
    sum_p L_p / P."""

    unit = "pairs"
    view_pairs = 6  # pairs in the token view (`after_training`)
    tracker_class = DPOTracker
    learner_role = PairLearner
    cfg: DPOJobConfig

    def load_data(self):
        d = self.cfg.data
        return load_preference_pairs(
            d.path,
            self.tokenizer,
            d.max_length,
            d.strict,
            d.split,
            rejected_weights=self.algorithm.critical_weights,
            revisions=revision_templates(self, TINY_ALPHABET),
        )

    def shard(self, pairs: list) -> list[list[list[Sample]]]:
        lc = self.cfg.learner
        return shard_pairs(
            pair_samples(pairs, self.algorithm.critical_weights, self.algorithm.token_rewards),
            lc.num_learners,
            lc.micro_batch_tokens,
            lc.micro_batch_size,
            self.packed,
        )

    def train_step(self, rows: list) -> dict[str, float]:
        parts = self.shard(rows)
        merged, sums = MetricSums(), []
        for m, rank_sums in self.learners.call("train_pairs", per_rank=[(p, len(rows)) for p in parts]):
            merged.merge(m)
            sums += [rank_sums] if rank_sums is not None else []
        total = sum(sums[1:], sums[0])  # each pair's sums come whole from one rank
        return {
            **merged.result(),
            **self.algorithm.metrics(total),
            "tokens": tokens([s for rank in parts for micro in rank for s in micro]),
        }

    def evaluate(self) -> dict[str, float]:
        """The implicit-reward metrics and the loss of the held-out pairs."""
        results = self.learners.call(
            "score_pairs", per_rank=[(p, len(self.eval_rows)) for p in self.shard(self.eval_rows)]
        )
        sums = [r for r in results if r is not None]
        total = sum(sums[1:], sums[0])
        out = {"eval/loss": self.algorithm.pair_loss(total).mean().item()}
        out.update({f"eval/{k}": v for k, v in self.algorithm.metrics(total).items()})
        return out

    def after_training(self) -> None:
        """The token view (`rlpost.tracking.token_view`) of the first held-out pairs, or training
        pairs when none are held out, for the losses that weigh tokens: cDPO's critical
        weights from the data, SparsePO's m^u of the final model from the learners."""
        algorithm = self.algorithm
        pairs = (self.eval_rows or self.train_rows)[: self.view_pairs]
        if algorithm.critical_weights:
            weight_name, weights = "critical weight w_t", [p.rejected_weights for p in pairs]
        elif algorithm.activation_masks or algorithm.learned_masks:
            masks = {}
            for rank in self.learners.call("rejected_masks", per_rank=[(p,) for p in self.shard(pairs)]):
                masks.update(rank)
            kind = "learned" if algorithm.learned_masks else "activation"
            kind = getattr(self.cfg.algorithm, "masks", kind)
            weight_name = f"SparsePO mask m^u ({kind})"
            weights = [masks[i].tolist() for i in range(len(pairs))]
        else:
            return  # every token weighs 1
        decode, where = self.tokenizer.decode, "held out" if self.eval_rows else "training"
        rows = [
            WeightedTokens(
                label=f"pair {p.row} ({where})",
                prompt=decode(p.prompt_ids),
                tokens=[decode([t]) for t in p.rejected_ids],
                weights=w,
                chosen=decode(p.chosen_ids),
            )
            for p, w in zip(pairs, weights)
        ]
        page, image = write_token_view(
            self.run_dir, rows, f"{self.run_dir.name}: {weight_name} of the rejected tokens", weight_name
        )
        self.tracker.print_line(f"token weights: {page} ({image.name})")


TRAINERS: dict[str, type[OfflineTrainer]] = {"sft": SFTTrainer, "dpo": DPOTrainer}
