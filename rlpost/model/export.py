"""The LM's weights as a plain model of its architecture names them: what engines load and
what a saved model holds.

With LoRA, peft's `.base_layer.` is dropped from the names, the adapter's own tensors are
left out, and each adapted weight is W + (alpha / r) B A (peft's `get_delta_weight`),
computed without touching the module (merging in place and unmerging would not restore W
bit for bit). Each tensor comes once: tied embeddings are one parameter, and a model of the
architecture ties them again when it loads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

_BASE = ".base_layer."


@dataclass
class Entry:
    name: str  # the plain model's name
    tensor: torch.Tensor  # the LM's parameter (or persistent buffer)
    lora: nn.Module | None  # the peft layer whose delta is added to it, if any


def export_entries(lm: nn.Module, lora: bool) -> list[Entry]:
    """The tensors a plain model of `lm`'s architecture holds, in state-dict order."""
    modules = dict(lm.named_modules()) if lora else {}
    entries, seen = [], set()
    for key, tensor in lm.state_dict(keep_vars=True).items():
        if id(tensor) in seen or ".lora_" in key:
            continue
        seen.add(id(tensor))
        layer = None
        if _BASE in key and key.endswith(_BASE + "weight"):
            layer = modules[key[: -len(_BASE + "weight")]]
        entries.append(Entry(key.replace(_BASE, "."), tensor, layer))
    return entries


def full_shape(tensor: torch.Tensor) -> tuple[int, ...]:
    """The whole shape: ZeRO-3 leaves a partitioned parameter empty and records it in ds_shape."""
    return tuple(getattr(tensor, "ds_shape", tensor.shape))


def merged(entry: Entry) -> torch.Tensor:
    if entry.lora is None:
        return entry.tensor.detach()
    weight = entry.tensor.detach()
    for adapter in entry.lora.active_adapters:
        weight = weight + entry.lora.get_delta_weight(adapter)
    return weight


@torch.no_grad()
def export_state_dict(lm: nn.Module, lora: bool) -> dict[str, torch.Tensor]:
    """The whole of `export_entries` on the CPU (the LM's parameters must be whole)."""
    return {e.name: merged(e).to("cpu", copy=True) for e in export_entries(lm, lora)}
