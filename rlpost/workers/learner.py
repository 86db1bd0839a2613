"""The learner role for token losses (RL and SFT), and the start of a learner group.

A step's result does not depend on how its mini-batch is cut into micro-batches or shared
among ranks (`train_minibatch`). The preference-pair role (`rlpost dpo`) is
`pair_learner.PairLearner`; both are `policy_rank.PolicyRank`s.
"""

from __future__ import annotations

import math
from functools import cached_property
from pathlib import Path

import torch
from torch import nn

from rlpost.algorithms import Correction, behaviour_weights
from rlpost.algorithms.base import (
    HISTORY_LOGP,
    PROMPT_ATTENTION,
    TOKEN_KL,
    PolicyGradient,
    SamplingRule,
    TokenTensors,
    position_divergence,
)
from rlpost.config.offline import OfflineConfig
from rlpost.config.rl import TrainConfig
from rlpost.data.batch import Sample, collate, per_sample
from rlpost.model.attention import packed_kwargs
from rlpost.model.ema import EMAPolicy
from rlpost.model.prompt_attention import PromptAttention
from rlpost.tracking.metrics import MetricSums
from rlpost.workers.group import Slots, WorkerGroup
from rlpost.workers.policy_rank import LRSchedule, PolicyRank
from rlpost.workers.reweighting import StepReweighting


def group_divergence(
    hidden: torch.Tensor, head: nn.Module, lengths: list[int], chunk_rows: int, temperature: float
) -> torch.Tensor:
    """TW-GRPO's D_t of one group (`algorithms.base.position_divergence`) over response positions
    t < its longest response, from `hidden`, the final states predicting its responses'
    tokens (flat, response after response, `lengths` tokens each).

    Memory is planned like the log-prob pass: at most `chunk_rows` rows of full-vocabulary
    log-probs at a time (a chunk of positions x the group's rollouts); positions past a
    rollout's end take the uniform distribution without computing anything."""
    starts = torch.tensor([0, *lengths[:-1]]).cumsum(0).tolist()
    longest, vocab = max(lengths), head.out_features  # (ZeRO-3 empties .weight)
    step = max(1, chunk_rows // len(lengths))
    divergence = []
    for t0 in range(0, longest, step):
        t1 = min(t0 + step, longest)
        # fp64: D is a small difference of large sums (0 where all rollouts agree)
        block = torch.full(
            (len(lengths), t1 - t0, vocab), -math.log(vocab), dtype=torch.float64, device=hidden.device
        )
        for i, (start, n) in enumerate(zip(starts, lengths)):
            if t0 < n:
                rows = hidden[start + t0 : start + min(t1, n)]
                block[i, : len(rows)] = (head(rows).double() / temperature).log_softmax(-1)
        divergence.append(position_divergence(block))
    return torch.cat(divergence)


EMA_FILE = "ema_policy.pt"  # in a checkpoint's directory: the history model's average (fp32)


class Learner(PolicyRank):
    """The policy's updates by a token loss (`algorithm.token_loss`), and the log-probs and
    TW-GRPO divergences the controller asks for before them."""

    def setup(self, master_addr: str, master_port: int) -> None:
        super().setup(master_addr, master_port)
        needs = self.algorithm.needs
        # ssToken's history model and attention signal (`selection_signals`)
        self.ema = EMAPolicy(self.engine.module, needs.ema_decay) if needs.history_model == "ema" else None
        self.prompt_attention = PromptAttention(self.engine.module) if needs.prompt_attention else None

    @torch.no_grad()
    def logprobs(
        self,
        micro_batches: list[list[Sample]],
        with_ref: bool = False,
        rule: SamplingRule | None = None,
        collision: bool = False,
    ) -> dict[str, torch.Tensor | None]:
        """Log-probs, entropies (and reference log-probs) of the response tokens of all
        the micro-batches, flat in their order: a few tensors cross back to the controller,
        not a few per micro-batch or per sequence.

        `rule`: the per-token temperature rule the samples were drawn under. Entropies
        are then at the base temperature, log-probs at each token's T_t, returned as
        "temperature" for the update pass to use.

        `collision`: also sum_v pi(v)^2 at each token, from the same forward (no `rule`)."""
        self.engine.eval()
        parts: dict[str, list[torch.Tensor]] = {
            "logp": [],
            "entropy": [],
            "ref_logp": [],
            "temperature": [],
            "collision": [],
        }
        for mb in micro_batches:
            if not mb:
                continue
            inputs = self._inputs(collate(mb, self.pad_id, self.packed))
            with self.clock("logprob"):
                if collision:
                    logp, ent, coll = self.engine.module.token_statistics(**inputs)
                    parts["collision"].append(coll)
                else:
                    logp, ent = self.engine(**inputs, rule=rule)
                parts["logp"].append(logp)
                parts["entropy"].append(ent)
                if rule is not None:
                    inputs["temperature"] = self.temperature * rule.factor(ent)
                    parts["temperature"].append(inputs["temperature"])
                if with_ref and self.ref is not None:
                    parts["ref_logp"].append(self.ref(**inputs)[0])
        self.engine.train()
        return {k: torch.cat(v).cpu() if v else None for k, v in parts.items()}

    @torch.no_grad()
    def position_divergence(self, groups: list[list[Sample]]) -> list[torch.Tensor]:
        """`group_divergence` of each group, one forward per group, at the sampling
        temperature."""
        model = self.engine.module
        head = model.lm.get_output_embeddings()
        self.engine.eval()
        out = []
        for group in groups:
            batch = collate(group, self.pad_id, self.packed)
            with self.clock("logprob"):
                hidden = model.hidden_states(
                    batch["input_ids"].to(self.device),
                    batch["pred_pos"].to(self.device),
                    **packed_kwargs(batch, self.device),
                )
                divergence = group_divergence(
                    hidden,
                    head,
                    [s.num_tokens for s in group],
                    self.cfg.learner.logprob_chunk_size,
                    self.temperature,
                )
            out.append(divergence.cpu())
        self.engine.train()
        return out

    @cached_property
    def correction(self) -> Correction | None:
        """The off-policy correction of RL updates (TrainConfig.off_policy); None when it is
        "none", for offline jobs (no such section) and for any learner not running a policy
        gradient: `rlpost train`'s SFT warm-up gets the same config and trains on data no
        engine sampled."""
        section = getattr(self.cfg, "off_policy", None)
        if section is None or section.correction == "none" or not isinstance(self.algorithm, PolicyGradient):
            return None
        return Correction(**section.model_dump())

    def _behaviour_logp(self, mb: list[Sample], batch: dict) -> torch.Tensor:
        """pi_b of the micro-batch's tokens; an error naming the first sample without them."""
        if "rollout_logp" not in batch:
            bad = next(s for s in mb if len(s.rollout_logp) != s.num_tokens)
            raise ValueError(
                f"off_policy.correction {self.correction.correction!r} needs the rollout engine's "
                f"log-prob of every response token (Sample.rollout_logp), but a sample has "
                f"{len(bad.rollout_logp)} for {bad.num_tokens} tokens; set off_policy.correction: none "
                "or use an engine that returns log-probs"
            )
        return batch["rollout_logp"].to(self.device)

    @cached_property
    def reweighting(self) -> StepReweighting | None:
        return StepReweighting.of(self.cfg, self.algorithm, self.rank, self.world_size, self.device)

    def _token_terms(self, mb: list[Sample]) -> tuple[torch.Tensor, dict, torch.Tensor | None, dict]:
        """One micro-batch's per-token loss (fp64, the off-policy correction applied) with
        its collated batch, entropies and the loss's token metrics: what the training pass
        and the reweighting's scoring pass both take the loss from."""
        batch = collate(mb, self.pad_id, self.packed)
        inputs = self._inputs(batch)
        get = lambda k: batch[k].to(self.device) if k in batch else None  # noqa: E731
        extra = {k: v.to(self.device) for k, v in batch["extra"].items()}
        ref_logp = get("ref_logp")
        needs = self.algorithm.needs
        with self.clock("update"):
            if needs.token_kl:  # ASFT: the KL to the reference with its gradient
                ref_hidden = self._reference(inputs)
                logp, ref_logp, extra[TOKEN_KL] = self.engine(
                    **inputs, reference=(ref_hidden, self.ref.lm.get_output_embeddings())
                )
                entropy = None
            else:
                logp, entropy = self.engine(**inputs)
                if not needs.entropy_grad:
                    entropy = entropy.detach()
            extra.update(self.selection_signals(inputs, batch))
            t = TokenTensors(
                logp=logp,
                old_logp=get("old_logp"),
                advantages=get("advantages"),
                entropy=entropy,
                ref_logp=ref_logp,
                seq_index=get("seq_index"),
                extra=extra,
            )
            token_loss, token_metrics = self.algorithm.token_loss(t)
            if self.correction is not None:  # under none the loss is not even multiplied by 1
                w, off_metrics = behaviour_weights(
                    t.old_logp, self._behaviour_logp(mb, batch), t.seq_index, self.correction, len(mb)
                )
                token_loss = token_loss.double() * w
                token_metrics = {**token_metrics, **off_metrics}
        return token_loss.double(), batch, entropy, token_metrics

    @torch.no_grad()
    def _sample_scales(self, micro_batches: list[list[Sample]], metrics: MetricSums) -> list[torch.Tensor]:
        """The reweighting's scoring pass: `StepReweighting.token_scales` of the micro-batches."""
        self.engine.eval()
        scored = []
        for mb in filter(None, micro_batches):
            token_loss, batch, _, _ = self._token_terms(mb)
            weights, seq_index = batch["weights"].to(self.device), batch["seq_index"].to(self.device)
            scored.append((token_loss, weights, seq_index, len(mb)))
        self.engine.train()
        return self.reweighting.token_scales(scored, metrics)

    def train_minibatch(self, micro_batches: list[list[Sample]], apply: bool = True) -> MetricSums:
        """One optimizer step over this rank's share of a mini-batch.

        Each micro-batch loss is sum(weight * token_loss) with weights normalised
        over the whole mini-batch, so the sum over micro-batches and ranks is the
        mini-batch loss. DeepSpeed averages gradients over ranks; multiplying by
        the world size turns that average back into the sum. `apply=False` leaves
        the summed gradients in place without stepping (tests read them). With
        reweighting (after its burn-in), a scoring pass first gives each sample's
        weights a factor N w_i (`_sample_scales`).
        """
        metrics = MetricSums()
        reweighted = self.reweighting is not None and self.reweighting.active(self.weight_version)
        scales = iter(self._sample_scales(micro_batches, metrics) if reweighted else ())

        def micro_loss(mb: list[Sample]) -> torch.Tensor:
            token_loss, batch, entropy, token_metrics = self._token_terms(mb)
            weights = batch["weights"].to(self.device)
            if reweighted:
                weights = weights * next(scales)[batch["seq_index"].to(self.device)]
            with self.clock("update"):
                loss = (token_loss * weights).sum()
            metrics.add_total("loss", loss)
            if entropy is not None:
                metrics.add_tokens("entropy", entropy)
            for name, values in token_metrics.items():
                metrics.add_tokens(name, values)
            return loss

        self._accumulate(micro_batches, micro_loss, apply, metrics)
        if apply and self.ema is not None:
            self.ema.update(self.engine.module)
        return metrics

    def selection_signals(self, inputs: dict, batch: dict) -> dict[str, torch.Tensor]:
        """After the policy's forward of `batch`: its tokens' prompt attention and log-probs
        under the history model, where `needs` asks (ssToken), for `TokenTensors.extra`."""
        out, history = {}, self.algorithm.needs.history_model
        if self.prompt_attention is not None:  # first: the reference may run the policy's LM (LoRA)
            out[PROMPT_ATTENTION] = self.prompt_attention.scores(batch)
        if history is not None:
            with torch.no_grad():
                out[HISTORY_LOGP] = (self.ref if history == "reference" else self.ema.model)(**inputs)[0]
        return out

    def save_checkpoint(self, ckpt_dir: str, tag: str) -> None:
        super().save_checkpoint(ckpt_dir, tag)
        if self.ema is not None and self.rank == 0:  # every rank's average is the same
            torch.save(self.ema.state_dict(), Path(ckpt_dir) / tag / EMA_FILE)

    def load_checkpoint(self, ckpt_dir: str, tag: str) -> None:
        super().load_checkpoint(ckpt_dir, tag)
        if self.ema is not None:
            self.ema.load_state_dict(torch.load(Path(ckpt_dir) / tag / EMA_FILE))

    def train_minibatches(self, minibatches: list[list[list[Sample]]]) -> list[MetricSums]:
        """`train_minibatch` of each of this rank's shares of mini-batches in turn, an
        optimizer step after each."""
        return [self.train_minibatch(micro_batches) for micro_batches in minibatches]

    def score_and_train(
        self, minibatches: list[list[list[Sample]]], with_ref: bool = False
    ) -> tuple[dict[str, torch.Tensor | None], list[MetricSums]]:
        """An RL step's learner work in one call, when the controller needs nothing from the
        log-prob pass before the update (`Needs.old_policy_entropy` False, one epoch): the
        old policy's log-probs of this rank's samples, in the micro-batches they train in,
        then `train_minibatches`. Returns `logprobs`'s results (flat, in the order of the
        samples in `minibatches`) and the metrics."""
        micro_batches = [micro for mb in minibatches for micro in mb]
        scores = self.logprobs(micro_batches, with_ref)
        samples = [s for micro in micro_batches for s in micro]
        split = per_sample(scores, samples)
        for s, logp, ref in zip(samples, split["logp"], split["ref_logp"]):
            s.old_logp, s.ref_logp = logp, ref
        return scores, self.train_minibatches(minibatches)


class ImplicitPRM(Learner):
    """PRIME's implicit PRM (algorithms/prime.py): a learner of its own loss whose log-probs
    are a reward model's, at temperature 1 whatever the policy samples at."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.temperature = 1.0


def checkpoint_tags(ckpt_dir: Path) -> list[str]:
    return sorted((p.name for p in ckpt_dir.glob("step_*") if p.is_dir()), key=lambda t: int(t.split("_")[1]))


def start_learner_group(
    cfg: TrainConfig | OfflineConfig,
    model_dir: Path | str,
    algorithm: tuple[str, dict] | None,
    schedule: LRSchedule,
    pad_id: int,
    use_ray: bool,
    slots: Slots | None = None,
    role: type[PolicyRank] = Learner,
) -> WorkerGroup:
    """All ranks of a learner group, joined in one process group at rank 0's node. `role`:
    the class each rank runs, `Learner` for token losses or another role (the job chooses);
    `algorithm` None for a role without one (`critic.Critic`)."""
    n = cfg.learner.num_learners
    group = WorkerGroup(
        role,
        n,
        lambda rank: dict(
            cfg=cfg,
            model_dir=str(model_dir),
            algorithm=algorithm,
            schedule=schedule,
            rank=rank,
            world_size=n,
            pad_id=pad_id,
        ),
        use_ray=use_ray,
        num_cpus=1,
        num_gpus=cfg.ray.gpus_per_learner,
        slots=slots,
        resources=cfg.ray.learner_resources,
    )
    address, port = group.call("rendezvous")[0]
    group.call("setup", address, port)
    return group
