"""The learner role for preference pairs (`rlpost dpo`): DPO, TDPO, SparsePO, cDPO's weighted DPO.

The losses are `algorithms/preference.py`'s, over pair-atomic micro-batches
(`data.pairs.shard_pairs`). SparsePO's masks are computed here: activation masks from the
reference's activations (`model.activations`), learned masks by networks trained with the
policy (a submodule of the PolicyModel, so one optimizer, schedule and checkpoint cover both).
"""

from __future__ import annotations

from functools import cached_property

import torch

from rlpost.algorithms import PairSums
from rlpost.algorithms.base import CHOSEN_SIDE, PAIR_INDEX, REWARD_WEIGHT, TOKEN_REWARD
from rlpost.data.batch import Sample, collate
from rlpost.model.activations import activation_means
from rlpost.model.policy import PolicyModel
from rlpost.model.token_ops import chunked_logprobs
from rlpost.tracking.metrics import MetricSums
from rlpost.workers.policy_rank import PolicyRank
from rlpost.workers.reweighting import StepReweighting


def per_response(
    values: torch.Tensor, seq_index: torch.Tensor, num_seqs: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flat per-token values [N, ...] (in sequence order) laid out as [num_seqs, longest
    response, ...], with the bool grid of real tokens and the (row, column) of each token."""
    lengths = torch.bincount(seq_index, minlength=num_seqs)
    column = torch.arange(len(seq_index), device=seq_index.device) - (lengths.cumsum(0) - lengths)[seq_index]
    grid = values.new_zeros(num_seqs, int(lengths.max()), *values.shape[1:])
    grid[seq_index, column] = values
    valid = torch.zeros(grid.shape[:2], dtype=torch.bool, device=values.device)
    valid[seq_index, column] = True
    return grid, valid, column


class PairLearner(PolicyRank):
    """The policy's updates by a pair loss (`algorithm.pair_loss`) and their evaluation
    (`train_pairs`, `score_pairs`); its algorithm is a `PairLoss`."""

    def add_trained_modules(self, policy: PolicyModel) -> None:
        """SparsePO's learned mask networks, when the algorithm trains them."""
        if self.algorithm.learned_masks:
            lm = policy.lm
            policy.masks = self.algorithm.mask_networks(
                lm.config.num_hidden_layers, lm.config.hidden_size, self.cfg.seed
            ).to(lm.dtype)

    def _sparsepo_mask(
        self, means: dict[str, list[torch.Tensor]], ref_hidden: torch.Tensor, batch: dict, num_seqs: int
    ) -> torch.Tensor:
        """SparsePO's activation mask (`PairLoss.activation_mask`) of each response token,
        flat [N]: every kind read at the positions that predict the tokens, as the log-probs
        are, and normalised over each response. The logits kind is their mean over the
        vocabulary, h . mean_v W_v + mean_v b_v, never materialised."""
        pred_pos, seq_index = batch["pred_pos"].to(self.device), batch["seq_index"].to(self.device)
        head = self.ref.lm.get_output_embeddings()
        mean_logit = ref_hidden.float() @ head.weight.float().mean(0)
        if head.bias is not None:
            mean_logit = mean_logit + head.bias.float().mean()
        kinds = {
            kind: [x.reshape(-1).index_select(0, pred_pos) for x in layers] for kind, layers in means.items()
        }
        kinds["logits"] = [mean_logit]
        _, valid, column = per_response(mean_logit, seq_index, num_seqs)
        grids = {
            kind: [per_response(x, seq_index, num_seqs)[0][..., None] for x in layers]
            for kind, layers in kinds.items()
        }
        return self.algorithm.activation_mask(grids, valid)[seq_index, column]

    @torch.no_grad()
    def _reference_layers(self, inputs: dict) -> list[torch.Tensor]:
        """The reference's `layer_states` of each response token, SparsePO's learned masks'
        input (the last is the final states)."""
        return self.ref.layer_states(**self._attention(inputs))

    def _reference_and_masks(
        self, batch: dict, inputs: dict, num_seqs: int
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The reference's final states predicting each response token [N, H], and SparsePO's
        masks m^u, m^d of the tokens [N] (None, None for the other losses). Learned masks
        carry the gradient of their networks wherever the grad mode allows it."""
        algorithm = self.algorithm
        if algorithm.learned_masks:
            layers = self._reference_layers(inputs)
            m_u, m_d = self.engine.module.masks(layers)
            return layers[-1], m_u, m_d
        if not algorithm.activation_masks:
            return self._reference(inputs), None, None
        with activation_means(self.ref.lm) as means:
            ref_hidden = self._reference(inputs)
        mask = self._sparsepo_mask(means, ref_hidden, batch, num_seqs)
        return ref_hidden, mask, mask  # one activation mask serves m^u and m^d

    def _pair_sums(self, mb: list[Sample], num_pairs: int) -> PairSums:
        """PairSums of the pairs of one micro-batch (`PairLoss.pair_sums`), with the
        gradient wherever the grad mode allows it."""
        batch = collate(mb, self.pad_id, self.packed)
        inputs = self._inputs(batch)
        extra = {k: v.to(self.device) for k, v in batch["extra"].items()}
        algorithm = self.algorithm
        ref_hidden, reward_weight, kl_weight = self._reference_and_masks(batch, inputs, len(mb))
        ref_head = self.ref.lm.get_output_embeddings()
        kl = None
        if algorithm.needs.token_kl:
            logp, ref_logp, kl = self.engine(**inputs, reference=(ref_hidden, ref_head))
        else:
            logp, _ = self.engine(**inputs)
            with torch.no_grad():
                ref_logp, _ = chunked_logprobs(
                    ref_hidden,
                    ref_head,
                    inputs["targets"],
                    self.cfg.learner.logprob_chunk_size,
                    self.temperature,
                )
        if algorithm.critical_weights:
            reward_weight = extra[REWARD_WEIGHT]
        return algorithm.pair_sums(
            logp,
            ref_logp,
            extra[PAIR_INDEX],
            extra[CHOSEN_SIDE],
            num_pairs,
            kl=kl,
            reward_weight=reward_weight,
            kl_weight=kl_weight,
            token_reward=extra[TOKEN_REWARD] if algorithm.token_rewards else None,
        )

    @cached_property
    def reweighting(self) -> StepReweighting | None:
        return StepReweighting.of(self.cfg, self.algorithm, self.rank, self.world_size, self.device)

    def _pair_losses(self, mb: list[Sample], num_pairs: int) -> tuple[PairSums, torch.Tensor, torch.Tensor]:
        """A micro-batch's PairSums, the PAIR_INDEX of its pairs and their losses L_p: what
        the training pass and the reweighting's scoring pass both take the loss from."""
        sums = self._pair_sums(mb, num_pairs)
        # pairs absent here have sums 0 and a loss of log 2: only the present count
        present = torch.tensor(sorted({int(s.extra[PAIR_INDEX][0]) for s in mb}), device=self.device)
        return sums, present, self.algorithm.pair_loss(sums).index_select(0, present)

    @torch.no_grad()
    def _pair_scales(
        self, micro_batches: list[list[Sample]], num_pairs: int, metrics: MetricSums
    ) -> torch.Tensor:
        """The reweighting's scoring pass: N w_p of each pair of this rank's micro-batches from
        its loss L_p, by PAIR_INDEX (1 at the other ranks' pairs); N is num_pairs."""
        self.engine.eval()
        with self.clock("update"):
            scored = [self._pair_losses(mb, num_pairs)[1:] for mb in micro_batches if mb]
        self.engine.train()
        index = torch.cat([i for i, _ in scored]) if scored else torch.zeros(0, dtype=torch.long)
        losses = torch.cat([loss for _, loss in scored]) if scored else torch.zeros(0)
        index, losses = index.to(self.device), losses.to(self.device, torch.float64)
        metrics.add_total("reweight/unweighted_loss", losses.sum() / num_pairs)
        scales = torch.ones(num_pairs, dtype=torch.float64, device=self.device)
        scales[index] = self.reweighting.multipliers(losses, metrics)
        return scales

    def train_pairs(
        self, micro_batches: list[list[Sample]], num_pairs: int, apply: bool = True
    ) -> tuple[MetricSums, PairSums | None]:
        """One optimizer step over this rank's share of a mini-batch of `num_pairs`
        preference pairs, numbered 0..num_pairs-1 over the whole mini-batch (PAIR_INDEX).

        Every micro-batch holds whole pairs, so each pair's sums are complete where its
        loss is taken (the preference losses are not linear in them); a micro-batch's loss
        is sum over its pairs of L_p / num_pairs, so the sum over micro-batches and ranks is
        the mini-batch's mean loss, and `* world_size` turns DeepSpeed's average over ranks
        back into that sum (as in `Learner.train_minibatch`). Returns the metric sums and this
        rank's PairSums (zero for the pairs of other ranks; the caller adds them up and
        computes `preference_metrics`). `apply=False`: as in `Learner.train_minibatch`."""
        metrics, totals = MetricSums(), []
        reweighted = self.reweighting is not None and self.reweighting.active(self.weight_version)
        scales = self._pair_scales(micro_batches, num_pairs, metrics) if reweighted else None

        def micro_loss(mb: list[Sample]) -> torch.Tensor:
            with self.clock("update"):
                sums, present, losses = self._pair_losses(mb, num_pairs)
                if scales is not None:
                    losses = losses * scales.index_select(0, present)
                loss = losses.sum() / num_pairs
            metrics.add_total("loss", loss)
            totals.append(sums.map(lambda x: x.detach().cpu()))
            return loss

        self._accumulate(micro_batches, micro_loss, apply, metrics)
        return metrics, sum(totals[1:], totals[0]) if totals else None

    @torch.no_grad()
    def score_pairs(self, micro_batches: list[list[Sample]], num_pairs: int) -> PairSums | None:
        """This rank's PairSums of `num_pairs` pairs without training (evaluation)."""
        self.engine.eval()
        total = None
        for mb in micro_batches:
            if mb:
                with self.clock("logprob"):
                    sums = self._pair_sums(mb, num_pairs).map(lambda x: x.cpu())
                total = sums if total is None else total + sums
        self.engine.train()
        return total

    @torch.no_grad()
    def rejected_masks(self, micro_batches: list[list[Sample]]) -> dict[int, torch.Tensor]:
        """SparsePO's m^u of the rejected response of each pair in `micro_batches` (cut by
        `shard_pairs`), by the pair's PAIR_INDEX: the token weights a person can look at."""
        self.engine.eval()
        out = {}
        for mb in micro_batches:
            if mb:
                batch = collate(mb, self.pad_id, self.packed)
                _, m_u, _ = self._reference_and_masks(batch, self._inputs(batch), len(mb))
                for s, m in zip(mb, m_u.float().cpu().split([s.num_tokens for s in mb])):
                    if not s.extra[CHOSEN_SIDE][0]:
                        out[int(s.extra[PAIR_INDEX][0])] = m
        self.engine.train()
        return out

    @torch.no_grad()
    def reference_logprobs(self, micro_batches: list[list[Sample]]) -> torch.Tensor | None:
        """The reference's log-prob of every response token of `micro_batches`, flat in their
        order (T-REG's token rewards: the responses after the revised prompts)."""
        self.engine.eval()  # a LoRA policy's reference is its base model: no dropout, as score_pairs
        out = []
        for mb in micro_batches:
            if mb:
                inputs = self._inputs(collate(mb, self.pad_id, self.packed))
                with self.clock("logprob"):
                    logp, _ = chunked_logprobs(
                        self._reference(inputs),
                        self.ref.lm.get_output_embeddings(),
                        inputs["targets"],
                        self.cfg.learner.logprob_chunk_size,
                        self.temperature,
                    )
                out.append(logp.float().cpu())
        self.engine.train()
        return torch.cat(out) if out else None
