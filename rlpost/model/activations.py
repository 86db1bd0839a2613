"""Per-layer activations of a decoder LM, recorded by forward hooks during a forward pass.

SparsePO's activation masks need each layer's activations only averaged over their last
dimension, so that is all the hooks keep: never a layer's full activations. The hooks are
removed when the context ends, whatever happens inside it.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def activation_means(lm: nn.Module):
    """Records, per kind, each decoder layer's activations averaged over their last
    dimension ([batch, length] each: SparsePO's activation masks need nothing more):
    "mlp" the MLP's hidden activations (the input of its down projection), "attention"
    the attention block's output, "residual" the residual stream after the layer."""
    layers = getattr(lm.base_model, "layers", None)
    if layers is None or not all(
        hasattr(layer, "mlp") and hasattr(layer.mlp, "down_proj") and hasattr(layer, "self_attn")
        for layer in layers
    ):
        raise ValueError(
            f"SparsePO activation masks read each decoder layer's mlp.down_proj and "
            f"self_attn (Llama, Qwen, Mistral, ...); {type(lm).__name__} has no such "
            f"layers"
        )
    means: dict[str, list[torch.Tensor]] = {"mlp": [], "attention": [], "residual": []}

    def keep(kind: str, x) -> None:
        x = x[0] if isinstance(x, tuple) else x
        means[kind].append(x.float().mean(-1))

    handles = []
    for layer in layers:
        handles += [
            layer.mlp.down_proj.register_forward_pre_hook(lambda m, args: keep("mlp", args[0])),
            layer.self_attn.register_forward_hook(lambda m, args, out: keep("attention", out)),
            layer.register_forward_hook(lambda m, args, out: keep("residual", out)),
        ]
    try:
        yield means
    finally:
        for handle in handles:
            handle.remove()
