"""Variable-length (packed) attention for transformers models.

Packed micro-batches put all sequences in one row. On CUDA with half
precision, torch's flash-attention varlen kernel attends within each sequence
given its boundaries (`cu_seqlens`), so no compute goes to padding or to pairs
of tokens from different sequences. Elsewhere transformers' SDPA path sees the
restarting position ids and builds a block-diagonal causal mask itself.
"""

from __future__ import annotations

import functools
import inspect

import torch

VARLEN = "rlpost_varlen"


def _varlen_attention(
    module,
    query,
    key,
    value,
    attention_mask,
    dropout: float = 0.0,
    scaling: float | None = None,
    cu_seq_lens_q=None,
    max_length_q=None,
    **kwargs,
):
    from torch.nn.attention.varlen import varlen_attn

    if cu_seq_lens_q is None:
        raise ValueError(f"{VARLEN} attention needs cu_seq_lens_q (a packed batch)")
    # [1, heads, T, head_dim] -> [T, heads, head_dim]
    q, k, v = (x.squeeze(0).transpose(0, 1) for x in (query, key, value))
    params = _varlen_params()
    kwargs = {"scale": scaling} if "scale" in params else {}  # else the default, head_dim ** -0.5
    if "window_size" in params:  # torch >= 2.12; 2.9-2.11 take is_causal
        kwargs["window_size"] = (-1, 0)
    else:
        kwargs["is_causal"] = True
    if q.shape[1] != k.shape[1]:  # grouped-query attention
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            k, v = (x.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for x in (k, v))
    out = varlen_attn(q, k, v, cu_seq_lens_q, cu_seq_lens_q, max_length_q, max_length_q, **kwargs)
    return out.unsqueeze(0), None


@functools.cache
def _varlen_params() -> frozenset[str]:
    from torch.nn.attention.varlen import varlen_attn

    return frozenset(inspect.signature(varlen_attn).parameters)


def varlen_available(device: torch.device, dtype: torch.dtype) -> bool:
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return False
    try:
        from torch.nn.attention import varlen  # noqa: F401  (torch >= 2.9)
    except ImportError:
        return False
    return True


def use_varlen_attention(lm) -> None:
    """Switch a transformers model to the varlen kernel (packed inputs only from then on)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(VARLEN, _varlen_attention)
    AttentionMaskInterface.register(VARLEN, flash_attention_mask)
    lm.set_attn_implementation(VARLEN)


def packed_kwargs(batch: dict, device) -> dict:
    """Forward arguments of a collated micro-batch for the model's attention."""
    if "position_ids" not in batch:
        return {"attention_mask": batch["attention_mask"].to(device)}
    cu = batch["cu_seqlens"].to(device)
    return {
        "position_ids": batch["position_ids"].to(device),
        "cu_seq_lens_q": cu,
        "cu_seq_lens_k": cu,
        "max_length_q": batch["max_seqlen"],
        "max_length_k": batch["max_seqlen"],
    }
