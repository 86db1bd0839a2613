"""The policy and reference models a learner computes with.

`PolicyModel` wraps a causal LM so that its forward yields only what the losses read:
log-probs and entropies of the chosen tokens, chunked from the final hidden states
(`token_ops`), never a [tokens x vocab] tensor. The reference is the frozen initial
model: under LoRA the policy's own LM with its adapter off (`BaseModelView`), else a
second copy in eval mode without gradients.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from rlpost.algorithms.base import SamplingRule
from rlpost.config.sections import LearnerConfig
from rlpost.model.attention import use_varlen_attention, varlen_available
from rlpost.model.fused_kernels import use_fused_kernels
from rlpost.model.head_kernels import head_logprobs, pick_logprob_kernel
from rlpost.model.load import load_model
from rlpost.model.lora import add_lora
from rlpost.model.token_ops import Temperature, chunked_collision, chunked_token_kl


class PolicyModel(nn.Module):
    """A causal LM whose forward returns log-probs and entropies of chosen tokens only.

    `masks`: SparsePO's learned mask networks when the algorithm trains them, a submodule
    so that DeepSpeed's optimizer, LR schedule, ZeRO partitioning, gradient clipping and
    checkpoints cover them with the LM (`export_weights` leaves them out).

    `logprob_kernel`: what computes the log-probs and entropies from the final states,
    "chunked" or "triton" (`learner.logprob_kernel`, rlpost/model/head_kernels.py)."""

    def __init__(self, lm: nn.Module, chunk_size: int, logprob_kernel: str = "chunked"):
        super().__init__()
        self.lm = lm
        self.chunk_size = chunk_size
        self.logprob_kernel = logprob_kernel
        self.masks: nn.Module | None = None  # SparsePO's learned masks (PairLoss.mask_networks)

    def hidden_states(self, input_ids, pred_pos, **attention) -> torch.Tensor:
        """[response tokens, hidden]: the final states that predict each response token."""
        hidden = self.lm.base_model(input_ids=input_ids, use_cache=False, **attention).last_hidden_state
        return hidden.reshape(-1, hidden.shape[-1]).index_select(0, pred_pos)

    def layer_states(self, input_ids, pred_pos, **attention) -> list[torch.Tensor]:
        """[response tokens, hidden] per decoder layer, at the positions that predict each
        response token: HF's `hidden_states` less the first. That one is the embedding
        lookup, a function of the token alone with no context to judge it by; the others
        are the layers' outputs, the last after the final norm, so it is `hidden_states`'s
        result as well and one forward serves the masks and the log-probs."""
        out = self.lm.base_model(input_ids=input_ids, use_cache=False, output_hidden_states=True, **attention)
        return [h.reshape(-1, h.shape[-1]).index_select(0, pred_pos) for h in out.hidden_states[1:]]

    def forward(
        self,
        input_ids,
        pred_pos,
        targets,
        temperature: Temperature = 1.0,
        rule: SamplingRule | None = None,
        reference: tuple[torch.Tensor, nn.Module] | None = None,
        **attention,
    ):
        """`attention`: `packed_kwargs` of the micro-batch (mask, or positions and cu_seqlens).

        With a `rule` (scoring a batch sampled under it; `temperature` is then the base
        T), the entropies returned are those at T and the log-probs those at the
        per-token temperature T_t the rule derives from them.

        With a `reference` (its final states predicting the same targets and its output
        head), returns instead the log-probs, the reference's log-probs and the
        full-vocabulary KL(pi_ref || pi_theta) per token, from one chunked pass."""
        hidden = self.hidden_states(input_ids, pred_pos, **attention)
        head = self.lm.get_output_embeddings()
        if reference is not None:
            return chunked_token_kl(hidden, head, *reference, targets, self.chunk_size, temperature)
        kernel = self.logprob_kernel
        logp, entropy = head_logprobs(hidden, head, targets, self.chunk_size, temperature, kernel)
        if rule is not None:
            logp, _ = head_logprobs(
                hidden, head, targets, self.chunk_size, temperature * rule.factor(entropy), kernel
            )
        return logp, entropy

    @torch.no_grad()
    def token_statistics(self, input_ids, pred_pos, targets, temperature: Temperature = 1.0, **attention):
        """The log-probs, entropies and sum_v pi(v)^2 of the response tokens, from one forward
        (the optimal token baseline's statistics of the old policy)."""
        hidden = self.hidden_states(input_ids, pred_pos, **attention)
        head = self.lm.get_output_embeddings()
        kernel = self.logprob_kernel
        logp, entropy = head_logprobs(hidden, head, targets, self.chunk_size, temperature, kernel)
        return logp, entropy, chunked_collision(hidden, head, self.chunk_size, temperature)


class BaseModelView(PolicyModel):
    """The reference model of a LoRA policy without a second copy: the policy's own LM with
    its adapter off (peft's `disable_adapter`) and in eval mode (no dropout, as a separate
    reference would be) for each forward. LoRA never changes the base weights and the output
    head is never adapted (`lora.check_targets`), so this is exactly the initial model."""

    def __init__(self, policy: PolicyModel, adapter):
        super().__init__(policy.lm, policy.chunk_size, policy.logprob_kernel)
        self._disable_adapter = adapter.disable_adapter  # a method: no submodule registered

    @contextmanager
    def _base(self):
        training = self.lm.training
        self.lm.eval()
        try:
            with self._disable_adapter():
                yield
        finally:
            self.lm.train(training)

    def hidden_states(self, *args, **kwargs) -> torch.Tensor:
        with self._base():
            return super().hidden_states(*args, **kwargs)

    def layer_states(self, *args, **kwargs) -> list[torch.Tensor]:
        with self._base():
            return super().layer_states(*args, **kwargs)


def load_policy(
    model_dir: str, dtype: str, lc: LearnerConfig, seed: int, device: torch.device
) -> tuple[PolicyModel, object | None, bool, bool]:
    """The policy to train, set up as `lc` asks. Returns it, the PeftModel handle of its
    LoRA adapter (None without LoRA; the adapter itself goes into the LM in place), whether
    its micro-batches are packed and whether Liger's fused kernels run in its body."""
    lm = load_model(model_dir, dtype)
    if lc.gradient_checkpointing:
        # non-reentrant (transformers 5's default): the reentrant kind gives no gradient
        # to a LoRA adapter inside a layer whose inputs (frozen embeddings) need none
        lm.gradient_checkpointing_enable({"use_reentrant": False})
    # "auto": pack where the varlen kernel exists. Elsewhere SDPA attends over a packed
    # row's whole block mask, and padded micro-batches win for short responses
    # (docs/performance.md).
    varlen = varlen_available(device, lm.dtype)
    packed = lc.packing == "packed" or (lc.packing == "auto" and varlen)
    if packed and varlen:
        use_varlen_attention(lm)
    fused = use_fused_kernels(lc.fused_kernels, lm, device.type == "cuda")
    adapter = add_lora(lm, lc.lora, seed) if lc.lora is not None else None
    # resolved here so that a triton the device cannot run fails at start, not mid-step
    kernel = pick_logprob_kernel(lc.logprob_kernel, device, partitioned=lc.zero_stage == 3)
    return PolicyModel(lm, lc.logprob_chunk_size, kernel), adapter, packed, fused


def load_reference(
    policy: PolicyModel,
    adapter,
    model_dir: str,
    dtype: str,
    lc: LearnerConfig,
    packed: bool,
    device: torch.device,
) -> PolicyModel:
    """The frozen initial model of `load_policy`'s `policy`, on `device`."""
    if adapter is not None:
        return BaseModelView(policy, adapter)
    lm = load_model(model_dir, dtype)
    if packed and varlen_available(device, lm.dtype):
        use_varlen_attention(lm)
    use_fused_kernels(lc.fused_kernels, lm, device.type == "cuda")
    ref = PolicyModel(lm, lc.logprob_chunk_size, policy.logprob_kernel)
    ref.to(device).eval().requires_grad_(False)
    return ref
