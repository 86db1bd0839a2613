"""Fused Triton kernels for the transformer body of CUDA learners (Liger Kernel).

transformers' eager decoder layers run RMSNorm, rotary embeddings and SwiGLU as
chains of small elementwise kernels, each a pass over device memory; Liger's
kernels do each in one pass and save less for the backward. On the H100 this took
the Qwen2.5-1.5B update from 0.847 to 0.668 s (16,384-token micro-batches)
(docs/performance.md). The output head is not Liger's: log-probs and entropies stay
with `rlpost.model.token_ops`.
"""

from __future__ import annotations

import importlib.util

from torch import nn

INSTALL = "pip install liger-kernel"


def liger_installed() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def supported(lm: nn.Module) -> bool:
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    return getattr(lm.config, "model_type", None) in MODEL_TYPE_TO_APPLY_LIGER_FN


def use_fused_kernels(setting: str, lm: nn.Module, on_gpu: bool) -> bool:
    """Swaps Liger's kernels into `lm` in place where `setting` ("auto", "liger" or "off",
    `learner.fused_kernels`) asks for them; returns whether it did.

    Liger patches RoPE at the level of the model's transformers module, so every model of
    that family in this process (a reference model, an in-process rollout engine on the
    same GPU) uses its kernel from then on; it computes the same function."""
    if setting == "off" or (setting == "auto" and not on_gpu):
        return False
    if not on_gpu:
        raise RuntimeError(
            "learner.fused_kernels=liger needs a CUDA learner (Liger's kernels are Triton); use auto or off"
        )
    if not liger_installed():
        if setting == "auto":
            return False
        raise RuntimeError(f"learner.fused_kernels=liger needs the liger-kernel package: {INSTALL}")
    if not supported(lm):
        if setting == "auto":
            return False
        raise RuntimeError(
            f"learner.fused_kernels=liger: Liger Kernel has no kernels for model "
            f"type {lm.config.model_type!r}; use auto or off"
        )
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    # cross entropy stays off: rlpost computes log-probs and entropies itself
    _apply_liger_kernel_to_instance(
        model=lm,
        rope=True,
        rms_norm=True,
        swiglu=True,
        geglu=True,
        cross_entropy=False,
        fused_linear_cross_entropy=False,
    )
    return True
