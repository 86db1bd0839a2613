"""ssToken's attention signal: how much each response token attends to its prompt.

For response token y_t (at its own position in the sequence, the row the paper's code reads),
the last decoder layer's attention probabilities to the prompt's positions, summed over them
and averaged over heads: in [0, 1]. A hook on the last layer's attention module keeps its
input (the normed hidden states and the rotary cos / sin) at each forward of the policy;
after the training forward, under no_grad, the layer's q and k are recomputed from it and
softmax(q k^T / sqrt(d)) is formed with the causal mask for the response rows only, one
sequence at a time ([heads, response, sequence] at most), so the attention kernel in use
(SDPA, flash, varlen) never has to return probabilities. Padded and packed micro-batches
both work: every position is found from the collated batch (`data.batch.collate`).
"""

from __future__ import annotations

import sys

import torch
from torch import nn


def last_attention(model: nn.Module) -> nn.Module:
    """The attention module of `model`'s (a `PolicyModel`'s) last decoder layer; a ValueError
    for a model whose attention this file cannot recompute."""
    layers = getattr(model.lm.base_model, "layers", None)
    attn = getattr(layers[-1], "self_attn", None) if layers else None
    rotary = getattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb", None) if attn else None
    if attn is None or rotary is None or not all(hasattr(attn, a) for a in ("q_proj", "k_proj", "scaling")):
        raise ValueError(
            f"prompt attention (ssToken) recomputes a rotary decoder's q and k; "
            f"{type(model.lm).__name__}'s last layer is not one"
        )
    if getattr(attn, "sliding_window", None):
        raise ValueError("prompt attention (ssToken): the last layer attends over a sliding window")
    return attn


class PromptAttention:
    """A hook on `model`'s last attention layer that keeps the layer's input of the latest
    forward (references, no copies), and the scores from it. With LoRA the reference model
    is the policy's own LM: read the scores before another model's forward."""

    def __init__(self, model: nn.Module):
        self.attn = last_attention(model)
        self.hidden: torch.Tensor | None = None
        self.cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None
        self.handle = self.attn.register_forward_pre_hook(self.keep, with_kwargs=True)

    def close(self) -> None:
        self.handle.remove()

    def keep(self, module, args, kwargs) -> None:
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        self.hidden = hidden.detach()
        self.cos_sin = tuple(x.detach() for x in kwargs["position_embeddings"])

    @torch.no_grad()
    def scores(self, batch: dict) -> torch.Tensor:
        """[N] float32: per response token of the collated `batch`, whose forward ran last,
        the head-averaged attention mass on its prompt (`prompt_scores`)."""
        if self.hidden is None:
            raise RuntimeError("prompt attention: the policy's last layer did not run")
        attn, hidden, cos_sin = self.attn, self.hidden, self.cos_sin
        self.hidden = self.cos_sin = None  # read once; the memory is not held to the next forward
        b, length = hidden.shape[:2]
        shape = (b, length, -1, attn.head_dim)
        q, k = attn.q_proj(hidden).view(shape), attn.k_proj(hidden).view(shape)
        if hasattr(attn, "q_norm"):  # Qwen3 normalises each head's q and k before the rotation
            q, k = attn.q_norm(q), attn.k_norm(k)
        rotary = sys.modules[type(attn).__module__].apply_rotary_pos_emb
        q, k = rotary(q.transpose(1, 2), k.transpose(1, 2), *cos_sin)
        flat = lambda x: x.transpose(1, 2).reshape(b * length, x.shape[1], -1)  # noqa: E731
        return prompt_scores(flat(q), flat(k), attn.scaling, *positions(batch, length, hidden.device))


def positions(batch: dict, width: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flat indices (into the micro-batch's [rows x width] positions) per response token: its
    own position (the one after `pred_pos`), its sequence's first position and the end of its
    sequence's prompt (exclusive)."""
    pred_pos, seq_index = batch["pred_pos"].to(device), batch["seq_index"].to(device)
    count = int(seq_index.max()) + 1 if len(seq_index) else 0
    if "cu_seqlens" in batch:  # packed: one row
        starts = batch["cu_seqlens"][:-1].to(device, torch.long)
    else:
        starts = torch.arange(count, device=device) * width
    sizes = torch.bincount(seq_index, minlength=count)
    offset = torch.arange(len(seq_index), device=device) - (sizes.cumsum(0) - sizes)[seq_index]
    return pred_pos + 1, starts[seq_index], pred_pos + 1 - offset


def prompt_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    scaling: float,
    query: torch.Tensor,
    start: torch.Tensor,
    prompt_end: torch.Tensor,
) -> torch.Tensor:
    """q [P, H, d], k [P, H_kv, d] (rotated, at every flat position P); per response token
    (flat indices `query`, `start`, `prompt_end` [N], a sequence's tokens contiguous):
    mean_h sum_{start <= j < prompt_end} softmax_j(q_query . k_j * scaling), the softmax over
    start <= j <= query. Returns [N] float32."""
    out = torch.empty(len(query), dtype=torch.float32, device=q.device)
    if not len(query):
        return out
    groups = q.shape[1] // k.shape[1]
    cuts = torch.nonzero(start[1:] != start[:-1]).flatten().add(1).tolist()
    for lo, hi in zip([0, *cuts], [*cuts, len(query)]):
        first, rows = int(start[lo]), query[lo:hi]
        keys = k[first : int(rows.max()) + 1].float().repeat_interleave(groups, dim=1)
        logits = torch.einsum("rhd,shd->hrs", q[rows].float(), keys) * scaling
        future = torch.arange(keys.shape[0], device=q.device) > (rows - first)[:, None]
        probs = logits.masked_fill(future, float("-inf")).softmax(-1)
        out[lo:hi] = probs[..., : int(prompt_end[lo]) - first].sum(-1).mean(0)
    return out
