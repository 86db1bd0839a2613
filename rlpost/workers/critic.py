"""PPO's value model (docs/algorithms.md section 5): a `PolicyRank` whose LM's final states go
through a linear value head instead of the output head.

Started like a learner group (`learner.start_learner_group(..., algorithm=None, role=Critic)`)
from its own model directory and `LRSchedule(cfg.critic.lr, cfg.critic.lr_warmup_steps)`; it
shares the learners' ZeRO stage, micro-batches, precision, weight decay and gradient clip
(`cfg.learner`). The value head is a submodule of the `PolicyModel`, so DeepSpeed's optimizer,
schedule, ZeRO partitioning, gradient clipping and checkpoints cover it with the LM.

The value loss is exact under any cut, like the policy's: each token's weight
(`Sample.weights`, set by the controller over the whole mini-batch, e.g. 1 / its token count)
makes the sum over micro-batches and ranks the mini-batch loss.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from rlpost.data.batch import Sample, collate
from rlpost.model.policy import PolicyModel
from rlpost.tracking.metrics import MetricSums
from rlpost.workers.policy_rank import PolicyRank

RETURNS, OLD_VALUES = "returns", "old_values"  # the Sample.extra keys train_values reads
VALUE_HEAD_FILE = "value_head.pt"  # save_pretrained's head beside the LM


class ValueModel(PolicyModel):
    """A `PolicyModel` whose forward is V(s_t) of each response token: the value head on the
    final state that predicts the token (the state before it), float32, flat [N]."""

    value_head: nn.Linear

    def forward(self, input_ids, pred_pos, **attention) -> torch.Tensor:
        hidden = self.hidden_states(input_ids, pred_pos, **attention)
        return self.value_head(hidden).squeeze(-1).float()


def value_loss(
    values: torch.Tensor, returns: torch.Tensor, old_values: torch.Tensor, clip: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token 0.5 max((V - R)^2, (clip(V, V_old - eps, V_old + eps) - R)^2) (eps None: 0.5
    (V - R)^2), and where the clipped branch is strictly the larger (its gradient is then 0)."""
    plain = (values - returns).square()
    if clip is None:
        return 0.5 * plain, torch.zeros_like(plain, dtype=torch.bool)
    clipped = (old_values + (values - old_values).clamp(-clip, clip) - returns).square()
    return 0.5 * torch.maximum(plain, clipped), clipped > plain


class Critic(PolicyRank):
    """V(s) of response tokens (`values`) and its updates by the clipped value loss
    (`train_values`). No algorithm and no reference model; the policy-only parts of
    `PolicyRank` (weight sync) are never called on it."""

    def add_trained_modules(self, policy: PolicyModel) -> None:
        """The value head, zero (V = 0 at the start on every rank, whatever the seed), and
        the forward that yields values: the engine's forward is where DeepSpeed hangs its
        backward bookkeeping (and ZeRO-3 its parameter fetches), so the critic's passes go
        through it as the policy's do."""
        lm = policy.lm
        head = nn.utils.skip_init(nn.Linear, lm.config.hidden_size, 1, dtype=lm.dtype)  # no RNG drawn
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
        policy.value_head = head
        policy.__class__ = ValueModel  # the same module, its forward the values'
        output = lm.get_output_embeddings()
        if output is not None and output.weight is not lm.get_input_embeddings().weight:
            # The output head is off the critic's graph: no gradient ever reaches it. Left in
            # the optimizer, decoupled weight decay would still shrink it every step (DeepSpeed
            # gives it a zero gradient under ZeRO-0 and steps it in its flat buffer under 1/2;
            # tested) and it would cost gradient and Adam state. Tied to the input embeddings
            # it is theirs, and they train.
            output.requires_grad_(False)

    def _values(self, mb: list[Sample]) -> tuple[torch.Tensor, dict]:
        batch = collate(mb, self.pad_id, self.packed)
        return self.engine(**self._attention(self._inputs(batch))), batch

    @torch.no_grad()
    def values(self, micro_batches: list[list[Sample]]) -> torch.Tensor:
        """V(s_t) of every response token of every sample, flat in their order (float32, CPU),
        in eval mode."""
        self.engine.eval()
        parts = []
        for mb in micro_batches:
            if mb:
                with self.clock("logprob"):
                    parts.append(self._values(mb)[0])
        self.engine.train()
        return torch.cat(parts).cpu() if parts else torch.zeros(0)

    def train_value_minibatch(self, micro_batches: list[list[Sample]], apply: bool = True) -> MetricSums:
        """One optimizer step over this rank's share of a mini-batch; `apply=False` leaves the
        summed gradients without stepping (tests read them). Each sample carries
        extra["returns"] R_t, extra["old_values"] V before this update and `weights`."""
        metrics = MetricSums()
        clip = self.cfg.critic.value_clip

        def micro_loss(mb: list[Sample]) -> torch.Tensor:
            with self.clock("update"):
                values, batch = self._values(mb)
                extra = batch["extra"]
                returns, old = extra[RETURNS].to(self.device), extra[OLD_VALUES].to(self.device)
                token_loss, clipped = value_loss(values, returns.float(), old.float(), clip)
                loss = (token_loss.double() * batch["weights"].to(self.device)).sum()
            metrics.add_total("critic/value_loss", loss)
            metrics.add_tokens("critic/value_mean", values)
            if clip is not None:
                metrics.add_tokens("critic/clip_frac", clipped.float())
            return loss

        step = MetricSums()  # _accumulate's "lr" and "grad_norm", renamed below
        self._accumulate(micro_batches, micro_loss, apply, step)
        for name, value in step.result().items():
            metrics.add_mean(f"critic/{name}", value)
        return metrics

    def train_values(self, minibatches: list[list[list[Sample]]]) -> list[MetricSums]:
        """`train_value_minibatch` of each of this rank's shares of mini-batches in turn, an
        optimizer step after each."""
        return [self.train_value_minibatch(micro_batches) for micro_batches in minibatches]

    def save_pretrained(self, out_dir: str) -> None:
        """The LM as `PolicyRank.save_pretrained` writes it, and the value head's state dict
        beside it (`VALUE_HEAD_FILE`)."""
        import deepspeed

        super().save_pretrained(out_dir)
        head = self.engine.module.value_head
        with deepspeed.zero.GatheredParameters(
            list(head.parameters()), enabled=self.cfg.learner.zero_stage == 3
        ):
            if self.rank == 0:
                state = {k: v.detach().cpu().clone() for k, v in head.state_dict().items()}
                torch.save(state, Path(out_dir) / VALUE_HEAD_FILE)
