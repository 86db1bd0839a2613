"""LoRA adapters (peft) on a learner's policy (`learner.lora`).

peft injects the adapter into the transformers model in place, so the learner's
PolicyModel calls the same model object as in full fine-tuning; the PeftModel that
`add_lora` returns is the handle for what peft adds: switching the adapter off (the
base model, i.e. the frozen initial weights, serves as the reference model) and saving
the adapter alone. Rollout engines and saved models get the merged weights
W + (alpha / r) B A under the base model's own parameter names (rlpost/model/export.py).
"""

from __future__ import annotations

import torch
from torch import nn

from rlpost.config.sections import LoraConfig, ModelConfig
from rlpost.errors import ConfigError
from rlpost.model.load import build_tiny_model


def _linear_types() -> tuple[type, ...]:
    from transformers.pytorch_utils import Conv1D  # GPT-2's linear layers

    return nn.Linear, Conv1D


def _matches(name: str, target: str) -> bool:
    """peft's rule for a list of target modules: the whole dotted name or a suffix after a dot."""
    return name == target or name.endswith("." + target)


def check_targets(lm: nn.Module, target_modules: list[str]) -> None:
    """A ConfigError naming `learner.lora.target_modules` unless each target matches a linear
    module of `lm` and not its output head: the learner's reference model shares the head with
    the policy and reads its weights directly. (peft itself fails only when no target matches.)"""
    head = lm.get_output_embeddings()
    head_name = next(name for name, module in lm.named_modules() if module is head)
    names = [
        name
        for name, module in lm.named_modules()
        if isinstance(module, _linear_types()) and module is not head
    ]
    bad = [t for t in target_modules if _matches(head_name, t) or not any(_matches(n, t) for n in names)]
    if bad:
        kinds = ", ".join(dict.fromkeys(n.rsplit(".", 1)[-1] for n in names))
        raise ConfigError(
            f"key 'learner.lora.target_modules': {', '.join(bad)} match no linear "
            f"module of the model, or its output head {head_name!r}, which cannot "
            f"be adapted (names match whole or as a dotted suffix); its other "
            f"linear modules: {kinds}"
        )


def check_model_config(model: ModelConfig, lora: LoraConfig) -> None:
    """`check_targets` before anything loads, on a weightless (meta-device) model built from
    the config (tiny) or the directory's config.json (hf). SmolLM2 exists as a directory only
    after its conversion; the learner checks it when it adds the adapter."""
    if model.kind not in ("tiny", "hf"):
        return
    with torch.device("meta"):
        if model.kind == "tiny":
            lm = build_tiny_model(model, vocab_size=3, seed=0)  # any vocabulary: same names
        else:
            from transformers import AutoConfig, AutoModelForCausalLM

            lm = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model.path))
    check_targets(lm, lora.target_modules)


def add_lora(lm: nn.Module, lora: LoraConfig, seed: int):
    """A fresh adapter on `lm` (in place; every other weight frozen) and its PeftModel.

    A starts from `seed` whatever the process drew before, so every rank and every run of
    a config starts from the same adapter; B starts at 0, so the adapted model starts as the
    base model."""
    import peft

    check_targets(lm, lora.target_modules)
    config = peft.LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.target_modules)
    )
    with torch.random.fork_rng(devices=[]):  # the model is still on the CPU here
        torch.manual_seed(seed)
        return peft.get_peft_model(lm, config)
